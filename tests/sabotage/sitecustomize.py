"""Breaks an api_server on purpose, to show that the reliability suite's verdicts fail when what
they check is broken (tests/test_reliability.py). Python imports `sitecustomize` at start-up from
sys.path: with this folder on PYTHONPATH, a `tidemind serve api_server` process whose environment
names breakages in TIDEMIND_SABOTAGE ("," between them) gets them:

  wrong-text    every 5th engine request after the 20th generates one token less than asked
  server-error  every 7th generation request after the 20th fails before it starts: a 500
  kv-leak       the 3rd set of KV blocks to be freed is never given back
  slot-leak     the 3rd in-flight slot to be released is never given back

(The first 20 requests are left alone: the suite's solo reference requests come first.)

The modules are patched as they are imported (a finder on sys.meta_path), so the server runs the
code of its own checkout with these few changes. Nothing happens in any other process.
"""
from __future__ import annotations

import importlib.abc
import itertools
import os
import sys

SABOTAGE = {s.strip() for s in os.environ.get("TIDEMIND_SABOTAGE", "").split(",") if s.strip()}


def _every(n: int, after: int = 20):
    calls = itertools.count(1)

    def due() -> bool:
        call = next(calls) - after
        return call > 0 and call % n == 0

    return due


def _nth(n: int):
    calls = itertools.count(1)
    return lambda: next(calls) == n


def _patch_generation(module) -> None:
    if "wrong-text" in SABOTAGE:
        submit, shorten = module.RequestGroup.submit, _every(5)

        def short_submit(self, prompt_ids, config, *args, **kwargs):
            if shorten() and config.max_new_tokens > 1:
                config = config.replace(max_new_tokens=config.max_new_tokens - 1)
            return submit(self, prompt_ids, config, *args, **kwargs)

        module.RequestGroup.submit = short_submit
    if "server-error" in SABOTAGE:
        submit_all, fail = module.submit_all, _every(7)

        def failing_submit_all(*args, **kwargs):
            if fail():
                raise RuntimeError("sabotage: server-error")
            return submit_all(*args, **kwargs)

        module.submit_all = failing_submit_all


def _patch_block_manager(module) -> None:
    if "kv-leak" in SABOTAGE:
        free, leak = module.BlockManager.free, _nth(3)

        def leaky_free(self, holder):
            if holder.block_ids and leak():
                holder.block_ids = []  # dropped without a reference given back: the blocks stay used
                return
            free(self, holder)

        module.BlockManager.free = leaky_free


def _patch_errors(module) -> None:
    if "slot-leak" in SABOTAGE:
        release, leak = module.Slot.release, _nth(3)

        def leaky_release(self):
            if self._limit is not None and leak():
                self._limit = None  # never counted down: the limit has one slot less from now on
                return
            release(self)

        module.Slot.release = leaky_release


PATCHES = {"tidemind.serve.openai.generation": _patch_generation, "tidemind.core.block_manager": _patch_block_manager,
           "tidemind.serve.openai.errors": _patch_errors}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of PATCHES with the other finders and patches each once it has run."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                exec_module = spec.loader.exec_module

                def exec_and_patch(module, exec_module=exec_module):
                    exec_module(module)
                    PATCHES[name](module)

                spec.loader.exec_module = exec_and_patch
                return spec
        return None


if SABOTAGE and "api_server" in sys.argv:
    sys.meta_path.insert(0, _PatchAfterImport())

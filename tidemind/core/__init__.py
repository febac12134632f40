"""Engine bookkeeping in pure Python, below the runner: requests, paged blocks, sessions, the
token-budget scheduler and the step contract it hands the runner. Nothing here imports torch (a
test checks it), so all of it is unit-tested on the CPU with a fake runner in milliseconds."""

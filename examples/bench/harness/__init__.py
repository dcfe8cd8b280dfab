"""The benchmark harness: step time, gradient reductions and peak memory of the ways to accumulate gradients.

Not part of the ``distaccum`` wheel: it runs from a checkout, from the repository root, as
``python -m examples.bench.harness ...`` (its results and their README are in ``examples/bench/``); its ranks run
the checkout's code whatever the working directory.

The contenders (:mod:`examples.bench.harness.methods`): (a) DDP with an all-reduce on every micro-batch, (b) the
hand-written ``no_sync`` loop, (c) distaccum, (g) distaccum with ``num_items``, (d) Accelerate's
``accumulate``, (e) DeepSpeed ZeRO 0, (h) distaccum driving a DeepSpeed engine (the integration), (f) the real
batch ``micro x k`` in one pass; for a fair comparison also (i) the hand-written loop and (j) distaccum, both
clipping the gradient norm (same work), and (k) an identical copy of (b), the A/A twin. Opt-in (``--methods``,
:mod:`examples.bench.harness.methods_sharded`): (l) to (n) distaccum over FSDP2 with ``grad_sync="boundary"``,
``"sharded"``, ``"every"``, (o) and (p) over HSDP (2 x 2 mesh, ``--nproc 4`` only) with ``"boundary"`` and
``"sharded"``, and (q) to (t) DeepSpeed ZeRO 2 and 3, by its own accumulation and driven by distaccum. The models
(:mod:`examples.bench.harness.models`): a 16.8M-parameter MLP (communication-heavy) and a small causal transformer
over ragged token sequences (activation-heavy).

How it measures (the design, and why):

* **Time**: one job of ``--nproc`` long-lived ranks builds every method of a case, then runs
  ``--warmup`` + ``--rounds`` rounds; in each round every method does one optimizer step on the same
  micro-batches, so machine drift (other jobs, thermal) hits all methods alike, in the order of a Williams design
  (:mod:`examples.bench.harness.order`): each method runs after each other one equally often, since a method's time
  depends on the one that ran before it. A step's time is the slowest rank's; the figure is the median over timed
  rounds, in wall time and in the process's CPU time (the largest rank's; what the method costs whatever else
  the machine runs).
* **Ratios** (:mod:`examples.bench.harness.report_ratios`): each method against (b) and the equal-work pairs
  ((c)/(b), (g)/(b), (j)/(i)) as the median of per-round ratios (a round's drift cancels), with a bootstrap
  interval; (k)/(b), two identical loops, is the measured noise floor, and the report says whether the rounds
  used resolve 1%.
* **Reductions**: counted while the timed steps run, never assumed: a DDP comm hook counts one call per
  gradient bucket; Python-level collectives (DeepSpeed's gradient all-reduce, distaccum's scalar window
  all-reduce) are counted by wrapping ``torch.distributed``'s functions: FSDP2's reduce-scatters at
  ``reduce_scatter_single``, ZeRO 3's at ``reduce_scatter_tensor``, HSDP's replica all-reduces as all-reduces over
  a sub-group. Reduce-scatters and all-reduces are reported apart, and the sharded methods count them per
  micro-step too. Sharded weights are read gathered for the sanity check (``DTensor.full_tensor()``,
  ``deepspeed.zero.GatheredParameters``).
* **Memory**: a fresh group of processes per (method, model, accum_steps): peak RSS of the process
  (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on GPU, the largest over ranks. A fresh process
  is the only way a peak belongs to one method alone, which is why memory is not measured in the timing job.
  ``--memory-accum-steps`` may name k values that are not timed; the report tabulates every method's peak against
  k (:mod:`examples.bench.harness.report_memory`).

* **A slow link** (``--link-rate 1Gbit``, Linux and root): the two ranks run as two nodes in network namespaces
  joined by a ``tc``-shaped veth pair (:mod:`examples.bench.harness.netns`, removed afterwards, also on failure),
  then the same timing job on loopback, next to ``distaccum plan``'s estimate at that rate.

* **Figure** (:mod:`examples.bench.harness.plot`, needs matplotlib): ``--plot PATH``, or ``X.png`` next to
  ``--json X.json``: peak memory per rank against k from the memory sweep, and step time against k per method.

Modules, in dependency order: ``models``, ``counting`` and ``records`` (what crosses the process boundary: a job,
what each rank measured) -> ``methods_base`` -> ``methods_sharded`` -> ``methods`` -> ``config``, ``netns``,
``report_ratios`` -> ``rows`` (the report's rows, fields in the order of their JSON keys) -> ``report_memory`` ->
``report``, ``report_link`` and ``plot`` -> ``launch`` (starts the ranks) -> ``cli`` (run by ``__main__``); each
rank runs ``python -m examples.bench.harness.worker``. ``overhead`` (``--overhead``) needs only ``order`` and
``config``.

Example:
    ``python -m examples.bench.harness --nproc 2 --json bench.json`` (a few minutes on 2 CPU cores).
"""

from examples.bench.harness.cli import add_arguments, main, run
from examples.bench.harness.config import BenchConfig
from examples.bench.harness.launch import run_benchmark

__all__ = ["BenchConfig", "add_arguments", "main", "run", "run_benchmark"]

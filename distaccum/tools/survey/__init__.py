"""Learning-rate survey: the real batch, the equivalent virtual batch and a small batch, side by side.

Each configuration trains a copy of the same initial model on the same sample stream while the learning rate
rises exponentially, once per optimizer step, and the window loss is recorded against the learning rate. A
virtual batch (``micro_batch_size x accum_steps x world_size``) that is really equal to the real batch lies
on the real batch's curve; a small batch usually gets unstable at another learning rate. ``distaccum survey``
runs it on scikit-learn's handwritten digits; :func:`lr_survey` runs it on any model.

Commands::

    distaccum survey --out survey-out
    torchrun --nproc_per_node 2 -m distaccum survey --out survey-out
    distaccum survey --tradeoff --out tradeoff-out     # steps and samples to a target loss per global batch

Modules, in dependency order: ``optional`` (lazy scikit-learn, matplotlib, tqdm), ``data`` (sample streams, the
digits task), ``curve`` (the record and its stop rule), ``report`` (summary, CSV, plot), ``run``
(:class:`SurveyConfig`, :func:`lr_survey`), ``noise`` (the brute-force gradient noise scale), ``tradeoff`` (the
critical-batch experiment and McCandlish's fit) and ``cli`` (``distaccum survey``).
"""

from distaccum.tools.survey.cli import add_arguments, run
from distaccum.tools.survey.curve import Curve, divergence_step
from distaccum.tools.survey.data import digits_task, stream_batches
from distaccum.tools.survey.report import SurveyResult, summarize
from distaccum.tools.survey.run import SurveyConfig, default_configs, lr_survey

__all__ = [
    "Curve",
    "SurveyConfig",
    "SurveyResult",
    "add_arguments",
    "default_configs",
    "digits_task",
    "divergence_step",
    "lr_survey",
    "run",
    "stream_batches",
    "summarize",
]

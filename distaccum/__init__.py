"""distaccum: gradient accumulation (virtual batches) equal to the real large batch, on one process or many.

>>> from distaccum import Accumulator, BatchPlan
"""

from distaccum.accumulator import Accumulator, StepResult
from distaccum.plan import BatchPlan
from distaccum.schedule import BatchSchedule

__version__ = "0.1.0"

__all__ = ["Accumulator", "BatchPlan", "BatchSchedule", "StepResult", "__version__"]

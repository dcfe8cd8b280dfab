"""Old import path of the learning-rate survey, which lives in :mod:`distaccum.tools.survey`.

Kept so that code written against it, ``from distaccum.survey import SurveyConfig, lr_survey, stream_batches``, works.
"""

from distaccum.tools.survey import *  # noqa: F403

__all__ = ["SurveyConfig", "lr_survey", "stream_batches"]  # noqa: F405

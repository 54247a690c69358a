"""The language-model testbed: a shared base and one fine-tuned expert per skill.

No model hub is reachable, so shoal builds models that behave like real ones
itself, reproducibly: skills from ``reasoning_gym`` generators (``chain_sum``,
``spell_backward``, ``gcd``) with held-out train/validation/test splits, a
byte-level BPE tokenizer trained offline, a tiny Llama base trained on a mix of
all skills, and one expert per skill fine-tuned from that base. Every model is a
normal Hugging Face directory that ``AutoModelForCausalLM`` loads.

- :func:`build_testbed` builds one (``"tiny"``: seconds, ``"small"``: minutes).
- :func:`load_testbed` opens it: model paths, skills, and
  :meth:`Testbed.task` giving a :class:`~shoal.tasks.generation.GenerationTask`
  that scores a model per example.
- :func:`report_testbed` scores every model on every skill.

``shoal.testbed.diffusion`` (imported on its own: it needs diffusers) builds the
diffusion testbed: class-conditional U-Nets on 8×8 digits and the classifier that
scores their images.
- :func:`build_vlm_testbed` (``testbed/vlm.py``) builds the vision-language testbed: a tiny
  LLaVA answering questions about digit images, and a text expert it lacks.
"""

from __future__ import annotations

from shoal.testbed.build import build_testbed
from shoal.testbed.load import Testbed, load_testbed
from shoal.testbed.report import TestbedReport, report_testbed
from shoal.testbed.sizes import SIZES, TestbedSize
from shoal.testbed.skills import SKILLS, SkillScorer, SkillSpec
from shoal.testbed.vlm import VLM_SIZES, build_vlm_testbed, score_vlm_testbed

__all__ = [
    "SIZES",
    "SKILLS",
    "VLM_SIZES",
    "SkillScorer",
    "SkillSpec",
    "Testbed",
    "TestbedReport",
    "TestbedSize",
    "build_testbed",
    "build_vlm_testbed",
    "load_testbed",
    "report_testbed",
    "score_vlm_testbed",
]

"""Profile-driven answer generator: simulated experts whose errors correlate like real LLMs'.

Expert n answers question q (subject s, correct option y) with option logits
    ℓ_qno = sharpness_n · ( 1[o = y]·(θ_ns − d_q) + ρ·a_qo + σ·ε_qno )
where d_q ~ N(0, σ_d) is a per-question difficulty shared by all experts, a_qo ~ N(0, 1) a shared
per-option "distractor" pull (so experts tend to pick the same wrong option), ε_qno private noise.
θ_ns is calibrated so that the expected accuracy of expert n on subject s equals
clip(skill.base + skill.categories[category(s)] + jitter_ns). The answer distribution is softmax(ℓ).
Latency/energy are left unmeasured (NaN): the cost model fills them from the profiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemoe.collab.cache import AnswerCache
from edgemoe.collab.data import QuestionSet
from edgemoe.collab.profiles import ExpertProfile, SkillProfile


@dataclass
class GeneratorConfig:
    difficulty_std: float = 1.0
    distractor_weight: float = 0.8
    noise_std: float = 1.0
    seed: int = 0


def _accuracy_curve(
    cfg: GeneratorConfig, num_options: int, samples: int = 20000
) -> tuple[np.ndarray, np.ndarray]:
    """Expected argmax accuracy as a function of θ (Monte-Carlo over difficulty and noise)."""
    rng = np.random.default_rng(12345)
    theta_T = np.linspace(-4.0, 8.0, 121)
    d_S = rng.normal(0.0, cfg.difficulty_std, size=samples)
    noise_SO = cfg.distractor_weight * rng.normal(size=(samples, num_options)) + cfg.noise_std * rng.normal(
        size=(samples, num_options)
    )
    margin_S = noise_SO[:, 0] - d_S - noise_SO[:, 1:].max(axis=1)
    acc_T = (theta_T[:, None] + margin_S[None, :] > 0).mean(axis=1)
    return theta_T, acc_T


def generate_cache(
    questions: QuestionSet, experts: list[ExpertProfile], cfg: GeneratorConfig | None = None
) -> AnswerCache:
    """Simulated answer distributions for every (question, expert) pair; deterministic in ``cfg.seed``."""
    cfg = cfg or GeneratorConfig()
    rng = np.random.default_rng(cfg.seed)
    num_q, num_n, num_o = len(questions), len(experts), questions.num_options
    theta_T, acc_T = _accuracy_curve(cfg, num_o)
    subjects = sorted(set(questions.subject))
    subj_index = {s: i for i, s in enumerate(subjects)}
    subj_Q = np.array([subj_index[s] for s in questions.subject])
    subj_cat = {s: questions.categories[questions.category_Q[questions.subject.index(s)]] for s in subjects}

    target_NS = np.empty((num_n, len(subjects)))
    for n, e in enumerate(experts):
        sk: SkillProfile = e.skill
        jitter = rng.normal(0.0, sk.subject_jitter, size=len(subjects))
        for j, s in enumerate(subjects):
            target_NS[n, j] = sk.base + sk.categories.get(subj_cat[s], 0.0) + jitter[j]
    target_NS = np.clip(target_NS, acc_T[0] + 1e-3, acc_T[-1] - 1e-3)
    theta_NS = np.interp(target_NS, acc_T, theta_T)

    d_Q = rng.normal(0.0, cfg.difficulty_std, size=num_q)
    pull_QO = rng.normal(size=(num_q, num_o))
    noise_QNO = rng.normal(size=(num_q, num_n, num_o))
    sharp_N = np.array([e.skill.sharpness for e in experts])
    correct_QO = np.eye(num_o)[questions.answer_Q]
    ability_QN = theta_NS[:, subj_Q].T - d_Q[:, None]
    logits_QNO = (
        ability_QN[:, :, None] * correct_QO[:, None, :]
        + cfg.distractor_weight * pull_QO[:, None, :]
        + cfg.noise_std * noise_QNO
    ) * sharp_N[None, :, None]
    logits_QNO -= logits_QNO.max(axis=2, keepdims=True)
    probs_QNO = np.exp(logits_QNO)
    probs_QNO /= probs_QNO.sum(axis=2, keepdims=True)
    nan_QN = np.full((num_q, num_n), np.nan)
    return AnswerCache(list(questions.qid), [e.name for e in experts], probs_QNO, nan_QN, nan_QN.copy())


_ZOO = (
    # (hardware, params_b, base accuracy)
    ("jetson-orin-nano", 1.0, 0.46),
    ("jetson-agx-orin", 3.0, 0.55),
    ("rtx-4090", 7.0, 0.62),
    ("jetson-agx-orin", 7.0, 0.61),
    ("rtx-4090", 3.0, 0.56),
    ("jetson-agx-orin", 1.5, 0.50),
    ("rtx-4090", 14.0, 0.66),
    ("jetson-orin-nano", 0.5, 0.42),
)
_SHORT = {"jetson-orin-nano": "nano", "jetson-agx-orin": "orin", "rtx-4090": "4090"}


def default_experts(num: int, categories: list[str], seed: int = 0) -> list[ExpertProfile]:
    """A heterogeneous zoo of ``num`` simulated experts: mixed hardware, sizes and specialisations.

    Each expert is strong in one category and weaker in another (+0.08..0.18 / −0.05..0.12), so a
    gate that knows the category can beat the best single expert.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        hw, params, base = _ZOO[i % len(_ZOO)]
        strong, weak = rng.choice(len(categories), size=2, replace=False)
        offsets = {
            categories[strong]: float(rng.uniform(0.08, 0.18)),
            categories[weak]: -float(rng.uniform(0.05, 0.12)),
        }
        out.append(
            ExpertProfile(
                name=f"{_SHORT[hw]}-{params:g}b-{i}",
                hardware=hw,
                params_b=params * float(rng.uniform(0.9, 1.1)),
                link_mbps=float(rng.choice([50.0, 100.0, 300.0])),
                skill=SkillProfile(
                    base=float(np.clip(base + rng.normal(0, 0.03), 0.3, 0.85)), categories=offsets
                ),
            )
        )
    return out

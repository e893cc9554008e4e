"""Paraphrases of the seen prompts: the prompt projection taught that they mean the seen prompt.

The AOVA learned one wording per seen category ("kidney tumor"). Another wording lands elsewhere in
the projection's output, and the map moves with it: "renal mass" lifted the map over the body and
the kidney tumour's Dice fell from 0.75-0.84 to 0.08-0.12 (seen phantoms, seed 80). The fix stays in
the text pathway: the projection's weight W becomes W + A P, where P projects out the span of the
seen prompt sets' sentence embeddings (so every seen prompt projects exactly as before and nothing
downstream needs retraining) and A is fit so that each paraphrase's prompt set projects onto the
seen prompt set it paraphrases, template by template. No image is used.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import get_preset
from .lesions import SEEN_KINDS, UNSEEN_KINDS
from .phantom import CATEGORIES
from .prompts import build_prompt_set
from .tokenizer import tokenize
from .training_data import SEEN, UNSEEN

# no wording names an unseen kind (metastasis, hemorrhage, abscess, pancreas, spleen, liver cyst)
TRAINING = {
    "brain tumor": ("brain tumour", "brain neoplasm", "tumor of the brain", "cerebral tumor", "brain cancer",
                    "brain lesion", "intracranial neoplasm", "primary brain tumor", "brain malignancy",
                    "tumor in the brain", "intracranial mass lesion", "mass in the brain"),
    "glioma": ("glial tumor", "glioblastoma", "astrocytoma", "low-grade glioma", "high-grade glioma", "gliomas",
               "oligodendroglioma", "diffuse glioma"),
    "brain cyst": ("cerebral cyst", "arachnoid cyst", "cystic brain lesion", "brain cysts", "cyst in the brain",
                   "cystic lesion of the brain"),
    "kidney tumor": ("renal tumor", "kidney tumour", "kidney cancer", "renal cell carcinoma", "kidney lesion",
                     "renal neoplasm", "tumor of the kidney", "kidney mass", "renal lesion", "mass in the kidney"),
    "liver tumor": ("hepatic tumor", "liver tumour", "liver cancer", "hepatocellular carcinoma", "hepatic neoplasm",
                    "tumor of the liver", "liver neoplasm", "liver mass", "hepatic lesion", "mass in the liver"),
    "lung nodule": ("pulmonary nodules", "lung nodules", "nodule in the lung", "lung tumor", "lung cancer",
                    "pulmonary lesion", "lung lesion", "lung mass", "pulmonary tumor"),
}
# chose the L2 (benchmarks/prereg/prompt_paraphrases_seen82_unseen3034.txt); in neither other list
VALIDATION = {"brain tumor": ("cerebral mass",), "kidney tumor": ("kidney neoplasm",),
              "liver tumor": ("liver lesion",), "lung nodule": ("pulmonary neoplasm",)}
# the pre-registered test's wordings: never fit, never used to choose anything
HELD_OUT = {"brain tumor": ("brain mass", "intracranial tumor", "cerebral neoplasm"), "glioma": ("glial neoplasm",),
            "brain cyst": ("intracranial cyst",), "kidney tumor": ("renal mass",), "liver tumor": ("hepatic mass",),
            "lung nodule": ("pulmonary nodule", "pulmonary mass")}


def seen_prompt_sets() -> list[tuple[str, str]]:
    """(target, modality) of every prompt set training used: seen phantoms and seen kinds on anatomy."""
    phantoms = [(c, CATEGORIES[c].modality) for c in SEEN]
    anatomy = [(k, m) for k in SEEN_KINDS for m in ("CT", "MR")]
    return sorted(set(phantoms + anatomy))


def paraphrase_pairs(table: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(paraphrase text, seen text) for every template, in every modality the seen target was trained in."""
    seen = seen_prompt_sets()
    pairs = []
    for target, wordings in table.items():
        for modality in (m for t, m in seen if t == target):
            texts = build_prompt_set(target, modality).texts
            for wording in wordings:
                pairs += zip(build_prompt_set(wording, modality).texts, texts)
    return pairs


def _check_lists() -> None:
    named = {w for table in (TRAINING, VALIDATION, HELD_OUT) for ws in table.values() for w in ws}
    unseen = set(UNSEEN) | set(UNSEEN_KINDS)
    if named & unseen or any(t not in {s for s, _ in seen_prompt_sets()} for t in TRAINING):
        raise ValueError("paraphrase lists must paraphrase seen targets and name no unseen one")


def fit_paraphrase_projection(weights: str | Path, out: str | Path, preset_name: str = "demo", l2: float = 1e-4,
                              steps: int = 4000, lr: float = 1e-2) -> dict:
    """Write `weights` with the projection fit to the paraphrases to `out`; report the cosines."""
    from .models import build_models
    from .models.weights import load_weights, save_weights
    from .train import _progress

    _check_lists()
    torch.manual_seed(0)
    models = build_models(get_preset(preset_name), 0)
    metadata = load_weights(models, weights)
    linear = models.projection.linear
    before, bias = linear.weight.detach().float().clone(), linear.bias.detach().float()

    def embed(texts) -> torch.Tensor:
        ids, mask = tokenize(list(texts))
        with torch.no_grad():
            return models.text_encoder(torch.from_numpy(ids), torch.from_numpy(mask)).float()

    def project(weight, sentences):
        return F.normalize(sentences @ weight.T + bias, dim=-1)

    seen_texts = sorted({t for target, m in seen_prompt_sets() for t in build_prompt_set(target, m).texts})
    seen = embed(seen_texts)
    basis, _ = torch.linalg.qr(seen.T)
    outside_seen = torch.eye(basis.shape[0]) - basis @ basis.T

    def embedded_pairs(table):
        """(paraphrase sentences, the seen prompt each should read as, projected as before the fit)"""
        pairs = paraphrase_pairs(table)
        return embed([a for a, _ in pairs]), project(before, embed([b for _, b in pairs]))

    def mean_cosine(weight, sentences, target) -> float:
        return float((project(weight, sentences) * target).sum(-1).mean())

    source, target = embedded_pairs(TRAINING)
    validation = embedded_pairs(VALIDATION)
    change = torch.zeros_like(before, requires_grad=True)
    optimizer = torch.optim.Adam([change], lr=lr)
    progress, task = _progress(steps, "paraphrases")
    with progress:
        for _ in range(steps):
            delta = change @ outside_seen
            loss = 1 - (project(before + delta, source) * target).sum(-1).mean() + l2 * delta.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            progress.update(task, advance=1, loss=f"loss {float(loss):.4f}")
    after = before + change.detach() @ outside_seen
    with torch.no_grad():
        linear.weight.copy_(after)
    report = {"l2": l2, "steps": steps, "training_pairs": len(source),
              "cosine_training": [mean_cosine(before, source, target), mean_cosine(after, source, target)],
              "cosine_validation": [mean_cosine(before, *validation), mean_cosine(after, *validation)],
              "seen_texts_lowest_cosine_to_before": float((project(after, seen) * project(before, seen)).sum(-1).min())}
    models.eval()
    save_weights(models, out, half=True, metadata={k: v for k, v in metadata.items() if k != "preset"})
    report["weights"] = str(out)
    return report

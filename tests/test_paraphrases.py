"""The paraphrase fit of the prompt projection: seen prompts untouched, paraphrases pulled to them."""

import pytest
import torch
from safetensors.torch import load_file

from diffugts import paraphrases
from diffugts.config import get_preset
from diffugts.models import build_models
from diffugts.models.weights import load_weights, save_weights
from diffugts.prompts import build_prompt_set
from diffugts.tokenizer import tokenize


def projected(models, texts):
    ids, mask = tokenize(list(texts))
    with torch.inference_mode():
        return models.stages()["text_encoder"](torch.from_numpy(ids)[None], torch.from_numpy(mask)[None])[0]


def test_the_fit_moves_paraphrases_to_their_seen_prompt_and_leaves_seen_prompts_alone(tmp_path, tiny_models):
    save_weights(tiny_models, tmp_path / "before.safetensors", half=True)
    report = paraphrases.fit_paraphrase_projection(tmp_path / "before.safetensors", tmp_path / "after.safetensors",
                                                   "tiny", steps=300)
    before, after = load_file(tmp_path / "before.safetensors"), load_file(tmp_path / "after.safetensors")
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["projection.linear.weight"]
    old, new = (build_models(get_preset("tiny"), seed=1) for _ in range(2))
    load_weights(old, tmp_path / "before.safetensors")
    load_weights(new, tmp_path / "after.safetensors")

    seen = [t for target, m in paraphrases.seen_prompt_sets() for t in build_prompt_set(target, m).texts]
    assert (projected(old, seen) * projected(new, seen)).sum(-1).min() > 0.999  # fp16 storage only
    assert report["seen_texts_lowest_cosine_to_before"] > 0.9999
    # the training pairs and the wordings kept apart from them both come closer to the seen prompt
    assert report["cosine_training"][1] > report["cosine_training"][0] + 0.01
    assert report["cosine_validation"][1] > report["cosine_validation"][0]
    pairs = paraphrases.paraphrase_pairs(paraphrases.HELD_OUT)
    target = projected(old, [b for _, b in pairs])
    cos_old = (projected(old, [a for a, _ in pairs]) * target).sum(-1).mean()
    cos_new = (projected(new, [a for a, _ in pairs]) * target).sum(-1).mean()
    assert cos_new > cos_old


def test_every_paraphrase_pair_keeps_the_template_and_modality():
    pairs = paraphrases.paraphrase_pairs({"kidney tumor": ("renal mass",)})
    # kidney tumours were trained on CT phantoms only: the three normal and three abnormal templates
    assert pairs[1] == ("normal renal tissue on CT", "normal kidney tissue on CT")
    assert pairs[4] == ("renal mass", "kidney tumor") and len(pairs) == 6
    assert len(paraphrases.paraphrase_pairs({"glioma": ("glial tumor",)})) == 12  # glioma: CT and MR anatomy


def test_the_lists_name_no_unseen_kind_and_keep_the_test_wordings_apart(monkeypatch):
    fitted = {w for ws in paraphrases.TRAINING.values() for w in ws}
    kept_apart = {w for table in (paraphrases.VALIDATION, paraphrases.HELD_OUT) for ws in table.values() for w in ws}
    assert not fitted & kept_apart
    monkeypatch.setitem(paraphrases.TRAINING, "brain tumor", ("brain abscess",))
    with pytest.raises(ValueError, match="no unseen one"):
        paraphrases.fit_paraphrase_projection("unused.safetensors", "unused-out.safetensors", "tiny")


def test_the_shipped_projection_reads_the_held_out_wordings_as_their_seen_prompt():
    from diffugts.config import bundled_weights

    demo = build_models(get_preset("demo"), seed=0)
    load_weights(demo, bundled_weights(get_preset("demo")))
    pairs = paraphrases.paraphrase_pairs(paraphrases.HELD_OUT)
    cosine = (projected(demo, [a for a, _ in pairs]) * projected(demo, [b for _, b in pairs])).sum(-1)
    # before the fit: 0.92 on average, 0.59 at worst ("a CT scan showing pulmonary mass")
    assert cosine.mean() > 0.98 and cosine.min() > 0.85
    renal = projected(demo, build_prompt_set("renal mass", "CT").texts)
    kidney = projected(demo, build_prompt_set("kidney tumor", "CT").texts)
    assert (renal * kidney).sum(-1).min() > 0.96

"""The tiny LLM's sub-word names: unseen names are new sequences of pieces seen in training."""

from __future__ import annotations

from lvface_mm.vqa.binding import BindingConfig, build_binding_vqa
from lvface_mm.vqa.schema import load_samples
from lvface_mm.vqa.sources import embedding_cluster_photos
from lvface_mm.vqa.testing import TinyLLMConfig, sample_names, sample_words, subword_tokenizer, tiny_llm_for_samples


def test_names_are_spelt_in_pieces_that_training_names_cover(tmp_path) -> None:
    config = BindingConfig(num_eval_identities=4, name_pool_size=800, train_per_task=200, eval_per_task=10)
    build_binding_vqa(embedding_cluster_photos(12, 3, dim=32, seed=0), tmp_path, config)
    train, evaluation = load_samples(tmp_path / "train.json"), load_samples(tmp_path / "eval.json")
    tokenizer = subword_tokenizer(sample_words(train + evaluation), sample_names(train + evaluation))
    vocab = tokenizer.get_vocab()
    train_pieces = {p for n in sample_names(train) for p in tokenizer.tokenize(n)}
    eval_names = sample_names(evaluation) - sample_names(train)
    assert eval_names  # open-set: evaluation names never occur in training
    for name in sorted(eval_names):
        pieces = tokenizer.tokenize(name)
        assert name not in vocab and len(pieces) >= 2 and pieces[0][0].isupper()
        assert all(p.startswith("##") for p in pieces[1:])
        assert tokenizer.unk_token not in pieces
        assert tokenizer.decode(tokenizer.encode(f"{name}.", add_special_tokens=False)) == f"{name}."
    # every piece of an unseen name was seen in training names (names cannot be memorised whole)
    covered = sum(set(tokenizer.tokenize(n)) <= train_pieces for n in eval_names) / len(eval_names)
    assert covered >= 0.9
    # the prompt's words stay whole words
    for word in ("unknown", "person", "references", "Who"):
        assert tokenizer.tokenize(word) == [word]


def test_tiny_llm_for_samples_uses_the_subword_tokenizer(tmp_path) -> None:
    config = BindingConfig(num_eval_identities=4, name_pool_size=200, train_per_task=10, eval_per_task=5)
    build_binding_vqa(embedding_cluster_photos(12, 3, dim=32, seed=0), tmp_path, config)
    samples = load_samples(tmp_path / "train.json")
    model, tokenizer = tiny_llm_for_samples(samples, TinyLLMConfig(subword_names=True))
    _, whole = tiny_llm_for_samples(samples, TinyLLMConfig())
    assert model.config.vocab_size == len(tokenizer)
    assert not sample_names(samples) & set(tokenizer.get_vocab())  # pieces, never one token per name
    name = sorted(sample_names(samples))[0]
    assert len(tokenizer.tokenize(name)) >= 2 and whole.tokenize(name) == [name]

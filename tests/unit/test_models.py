from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from areal_like.core.models import ModelBuildConfig, build_model, load_model, load_tokenizer, make_model
from areal_like.core.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer, encode_checked

TEXTS = ["3+5=8", "  (12 - 3) * 4 = 36 ", "7/7=1", ""]


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory) -> str:
    return build_model(ModelBuildConfig(seed=0), str(tmp_path_factory.mktemp("models") / "tiny"))


def test_tokenizer_ids_are_specials_then_alphabet():
    tok = build_char_tokenizer("ab")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.encode("ab ", add_special_tokens=False)[:2] == [3, 4]
    assert len(build_char_tokenizer(DEFAULT_ALPHABET)) == 3 + len(DEFAULT_ALPHABET)


def test_tokenizer_round_trips_through_save_and_auto_tokenizer(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character, no bos/eos added
        assert reloaded.encode(text, add_special_tokens=False) == ids
        assert reloaded.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text


def test_tokenizer_in_model_dir_loads_identically(built_dir):
    tok = build_char_tokenizer()
    reloaded = load_tokenizer(built_dir)
    for text in TEXTS:
        assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert reloaded.decode(tok.encode(text, add_special_tokens=False)) == text


def test_encode_checked_names_unknown_characters():
    tok = build_char_tokenizer()
    assert encode_checked(tok, "1+1=") == tok.encode("1+1=", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"\['x'\]"):
        encode_checked(tok, "1+x=")


def test_non_ascii_or_repeated_alphabet_is_rejected():
    with pytest.raises(ValueError, match="non-ASCII"):
        build_char_tokenizer("abé")
    with pytest.raises(ValueError, match="repeats"):
        build_char_tokenizer("abca")


def test_built_model_loads_with_auto_classes_and_matches_in_memory_logits(built_dir):
    model, tok = make_model(ModelBuildConfig(seed=0))
    loaded = AutoModelForCausalLM.from_pretrained(built_dir, local_files_only=True)
    assert loaded.dtype == torch.float32
    assert loaded.config.eos_token_id == tok.eos_token_id == loaded.generation_config.eos_token_id
    assert loaded.config.pad_token_id == tok.pad_token_id == loaded.generation_config.pad_token_id
    input_ids = torch.tensor([tok.encode("12+34=46", add_special_tokens=False)])
    with torch.no_grad():
        expected = model.eval()(input_ids).logits
        actual = loaded.eval()(input_ids).logits
    assert actual.shape == (1, input_ids.shape[1], len(tok))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_same_seed_gives_same_weights_and_other_seed_differs():
    state_a = make_model(ModelBuildConfig(seed=1))[0].state_dict()
    state_b = make_model(ModelBuildConfig(seed=1))[0].state_dict()
    state_c = make_model(ModelBuildConfig(seed=2))[0].state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["model.embed_tokens.weight"], state_c["model.embed_tokens.weight"])


def test_building_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_model(ModelBuildConfig(seed=5))
    torch.testing.assert_close(torch.rand(3), expected)


def test_build_refuses_a_non_empty_dir_unless_overwrite(built_dir):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_model(ModelBuildConfig(seed=3), built_dir)
    parent = os.path.dirname(built_dir)
    other = build_model(ModelBuildConfig(seed=3), os.path.join(parent, "other"))
    build_model(ModelBuildConfig(seed=4), other, overwrite=True)
    assert sorted(os.listdir(parent)) == ["other", "tiny"]  # no temporary siblings left behind
    assert load_model(other).config.eos_token_id == 1


def test_loaders_name_a_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": 100, "num_heads": 8}, "hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"max_position_embeddings": 1}, "max_position_embeddings"),
        ({"alphabet": ""}, "alphabet"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ModelBuildConfig.{field}"):
        ModelBuildConfig(**overrides)

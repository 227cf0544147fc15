"""The offline word-level text encoder: tokenisation of numbers and notes, padding, files."""
import pytest
import torch

from pysonic.text.word_encoder import (EOS, NOTE, NUM, WordEncoderConfig, WordTextEncoder, build_vocab,
                                       note_frequency, numeric_features, tokenize, value_code_features)

CAPTIONS = ["a sine tone at 440 Hz", "a loud square wave playing the note A4", "pink noise",
            "a drum beat at 120 bpm", "5 clicks per second"]


def test_note_frequency():
    assert note_frequency("A4") == pytest.approx(440.0)
    assert note_frequency("a2") == pytest.approx(110.0)
    assert note_frequency("C#5") == pytest.approx(554.365, rel=1e-5)
    assert note_frequency("Bb3") == pytest.approx(233.082, rel=1e-5)
    with pytest.raises(ValueError, match="not a note name"):
        note_frequency("H2")


def test_tokenize_numbers_notes_words():
    assert tokenize("A sine at 440Hz") == [("a", None), ("sine", None), ("at", None), (NUM, 440.0), ("hz", None)]
    assert tokenize("the note c#4, loud") == [("the", None), ("note", None), (NOTE, pytest.approx(277.183, rel=1e-5)),
                                               (",", None), ("loud", None)]
    assert tokenize("2.5 beeps") == [(NUM, 2.5), ("beeps", None)]
    assert tokenize("") == []


def test_numeric_features_resolve_a_quarter_tone():
    f = numeric_features(torch.tensor([440.0, 440.0 * 2 ** (1 / 24), 880.0]))
    assert (f[0] - f[1]).abs().max() > 0.3  # 50 cents apart: clearly different features
    assert torch.isfinite(numeric_features(torch.tensor([0.0]))).all()


def _encoder(seed=0):
    torch.manual_seed(seed)
    return WordTextEncoder(WordEncoderConfig(vocab=build_vocab(CAPTIONS), dim=32, layers=2, heads=2)).eval()


def test_batch_equals_items_and_padding_is_masked():
    enc = _encoder()
    prompts = ["a sine tone at 440 Hz", "", "an unseen zebra word at 300 hz"]
    states, mask = enc.encode(prompts)
    assert states.shape[:2] == mask.shape and mask.sum(1).tolist() == [7, 1, 8]
    for i, p in enumerate(prompts):
        s1, m1 = enc.encode([p])
        n = int(m1.sum())
        torch.testing.assert_close(states[i, :n], s1[0, :n], rtol=1e-5, atol=1e-5)  # fp32, order of sums only
        assert (states[i, n:] == 0).all()


def test_value_changes_the_states():
    enc = _encoder()
    a, _ = enc.encode(["a sine tone at 440 Hz"])
    b, _ = enc.encode(["a sine tone at 450 Hz"])
    assert (a - b).abs().max() > 1e-3


def test_save_and_load(tmp_path):
    enc = _encoder()
    enc.save_pretrained(tmp_path)
    again = WordTextEncoder.from_pretrained(tmp_path)
    x, _ = enc.encode(CAPTIONS)
    y, _ = again.encode(CAPTIONS)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    (tmp_path / "config.json").write_text('{"type": "t5"}')
    with pytest.raises(ValueError, match="not a word_text_encoder"):
        WordTextEncoder.from_pretrained(tmp_path)


def test_bad_prompts():
    enc = _encoder()
    with pytest.raises(TypeError, match="every prompt must be a string"):
        enc.encode(["fine", 3])
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])


def test_eos_always_present():
    enc = _encoder()
    ids, _, lengths = enc.tokens(["x " * 200])
    assert lengths.item() == enc.config.max_tokens and ids[0, -1] == enc.index[EOS]
    states, mask = enc.encode(["a sine tone at 440 hz", ""], length=4)  # fixed length: truncated/padded
    assert states.shape[1] == 4 and mask.sum(1).tolist() == [4, 1]


def _coded(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = WordEncoderConfig(vocab=build_vocab(CAPTIONS), dim=32, layers=2, heads=2, value_code=16, **kw)
    return WordTextEncoder(cfg).eval()


def test_value_code_is_added_to_number_tokens_only():
    coded = _coded()
    plain = WordTextEncoder(WordEncoderConfig(**{**coded.config.__dict__, "value_code": 0})).eval()
    plain.load_state_dict(coded.state_dict(), strict=False)  # same weights, no code buffers
    prompt = ["a sine tone at 440 Hz", "the note A4, loud"]
    a, mask = coded.encode(prompt)
    b, _ = plain.encode(prompt)
    ids, _, _ = coded.tokens(prompt)
    is_num = (ids == coded.index[NUM]) | (ids == coded.index[NOTE])
    diff = (a - b).norm(dim=-1)
    assert (diff[~is_num] == 0).all()  # words, <eos> and padding: untouched
    # 440 Hz and A4 are the same value: the same code, of norm scale * |bumps| (orthonormal projection)
    bumps = value_code_features(torch.tensor(440.0), coded.value_centres)
    torch.testing.assert_close(diff[is_num], torch.full((2,), 3.0 * float(bumps.norm())), rtol=1e-5, atol=1e-5)


def test_value_code_places_values_between_their_neighbours():
    torch.manual_seed(0)
    cfg = WordEncoderConfig(vocab=build_vocab(CAPTIONS), dim=64, layers=1, heads=2, value_code=64)  # 1/8 octave apart
    centres = WordTextEncoder(cfg).value_centres
    code = lambda hz: value_code_features(torch.tensor(float(hz)), centres)
    cos = lambda x, y: float((code(x) * code(y)).sum() / code(x).norm() / code(y).norm())
    assert cos(300, 303) > 0.99 and cos(300, 600) < 1e-6  # 17 cents apart: near-identical; an octave: disjoint
    assert cos(300, 320) > cos(300, 340) > cos(300, 400)  # similarity falls with the interval


def test_value_code_survives_save_and_load(tmp_path):
    enc = _coded(value_code_range=(50.0, 2000.0))
    enc.save_pretrained(tmp_path)
    again = WordTextEncoder.from_pretrained(tmp_path)
    assert again.config.value_code_range == (50.0, 2000.0)
    torch.testing.assert_close(enc.encode(CAPTIONS)[0], again.encode(CAPTIONS)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kw, message", [({"value_code": 1}, "0 \\(off\\) or >= 2"), ({"value_code": 64}, "exceeds dim"),
                                         ({"value_code_range": (100.0, 50.0)}, "0 < low < high")])
def test_value_code_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        WordEncoderConfig(vocab=build_vocab(CAPTIONS), dim=32, **{"value_code": 16, **kw})

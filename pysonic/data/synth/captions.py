"""Caption phrasings, the caption tokeniser and vocabulary, and a parser back to attributes.

The grammar is deliberately small (a tiny text encoder trained from scratch must learn it) but has
several phrasings per attribute: word order, synonyms, units written out or not ("440 Hz",
"440 hertz", "a 440-hertz ..."), note names ("A4", "the note A4").

Number conventions (what a text encoder needs to know):

- frequencies and tempos are integers written as digits ("440 Hz", "120 BPM"); chord roots, scale
  starts and named tones use note names A2..A6 with sharps only ("C#4"); rates of clicks/beeps are
  1..10, written as digits or as words ("four", "once per second" for 1);
- :func:`tokenize` splits a caption into lower-case words, single digits (so "700", held out from
  training, is "7 0 0", made of seen tokens), punctuation marks, and note names as three tokens
  ``["F", "#", "4"]`` with the letter kept upper-case (so the note "A" never collides with the
  article "a"); :func:`vocabulary` lists every token a caption can contain.
"""
from __future__ import annotations

import re

import numpy as np

from pysonic.data.synth.spec import BEEP_DEFAULT_HZ, LOUDNESS_DB, Sound, SynthSpec, midi_to_hz, note_to_midi

__all__ = ["make_caption", "tokenize", "vocabulary", "parse_caption", "NUMBER_WORDS"]

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

WAVE_WORDS = {"sine": ("sine",), "square": ("square",), "sawtooth": ("sawtooth", "saw"), "triangle": ("triangle",)}
TONE_NOUNS = ("tone", "wave")
TONE_TEMPLATES = (  # {a}: article, {W}: "<waveform> <noun>", {P}: pitch, {A}: pitch as adjective
    "{a} {W} at {P}",
    "{a} {A} {W}",
    "{W} at {P}",
    "{a} {W} playing {P}",
    "{a} {W} with a pitch of {P}",
    "{a} {W} of {P}",
    "{P}, {W}",
)
NOTE_ONLY_TONE_TEMPLATES = ("{N} played on {a} {W}", "the note {N} as {a} {W}")
CHORD_TEMPLATES = (  # {N}: root note, {Q}: major/minor
    "{a} {N} {Q} chord", "{a} {Q} chord on {N}", "{a} {Q} chord with root {N}", "{a} {N} {Q} triad",
    "{N} {Q} chord", "{a} {Q} triad rooted on {N}",
)
DIRECTION_WORDS = {"rising": ("rising", "ascending", "upward"), "falling": ("falling", "descending", "downward")}
DIRECTION_VERBS = {"rising": ("going up",), "falling": ("going down",)}
SCALE_TEMPLATES = (  # {D}: direction adjective, {V}: direction verb
    "{a} {D} scale starting on {N}", "{a} {D} major scale from {N}", "{a} major scale {V} from {N}",
    "{a} scale {V} from {N}", "{a} {D} melody starting on {N}", "{a} melody {V} a major scale from {N}",
)
BPM_FORMS = ("{n} BPM", "{n} bpm", "{n} beats per minute")
DRUM_TEMPLATES = (  # {B}: tempo phrase, {n}: tempo digits
    "{a} drum beat at {B}", "{a} {n} BPM drum beat", "drums at {B}", "{a} drum loop at {B}",
    "{a} beat with kick, snare and hi-hat at {B}", "{a} drum pattern, {B}", "kick and snare drums playing at {B}",
)
NOISE_WORDS = {"white": ("white",), "pink": ("pink",), "brown": ("brown", "brownian", "red")}
NOISE_TEMPLATES = ("{C} noise", "steady {C} noise", "constant {C} noise", "{a} {C} noise signal", "some {C} noise")
SWEEP_NOUNS = ("sweep", "chirp", "sine sweep", "frequency sweep")
SWEEP_TEMPLATES = ("{a} {D} {S}", "{a} {S} {V}", "{a} tone sweeping {U}")  # {U}: up/down
SWEEP_NAMED_TEMPLATES = (  # {F0}, {F1}: end points (digits)
    "{a} {S} from {F0} to {F1} Hz", "{a} {S} from {F0} Hz to {F1} Hz", "{a} tone sweeping from {F0} to {F1} hertz",
    "{a} {D} {S} from {F0} Hz to {F1} Hz",
)
CLICK_NOUNS = {"click": ("click", "clicks"), "beep": ("beep", "beeps")}
CLICK_TEMPLATES = ("{r} {Ns} per second", "{Ns} at {r} per second", "{a} {N1} repeating {t} per second", "{Ns}, {r} per second")
BEEP_NAMED_TEMPLATES = ("{Ns} at {P}, {r} per second", "{a} {A} {N1}, {t} per second")
SILENCE_TEMPLATES = ("silence", "complete silence", "total silence", "no sound at all", "{a} silent recording", "nothing but silence")
MIXTURE_TEMPLATES = ("{X} over {Y}", "{X} on top of {Y}", "{X} with {Y} in the background")
LOUDNESS_ADJ = {"quiet": ("quiet", "soft"), "moderate": ("moderate",), "loud": ("loud",)}
LOUDNESS_SUFFIX = {"quiet": ("at low volume", "played quietly"), "moderate": ("at medium volume", "at moderate volume"),
                   "loud": ("at high volume", "played loudly")}
HZ_FORMS = ("{f} Hz", "{f} hertz")
HZ_ADJ_FORMS = ("{f} Hz", "{f}-hertz")
NOTE_FORMS = ("{N}", "the note {N}", "note {N}")


def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _article(word: str) -> str:
    w = word.strip(",")
    if re.fullmatch(r"[AEF]#?\d", w):  # "an A4", "an F#3"
        return "an"
    if w[:1].isdigit():
        return "an" if w.startswith("8") or re.match(r"^1[18](\d\d)?\b", w) else "a"
    return "an" if w[:1].lower() in "aeiou" else "a"


def _resolve_articles(text: str) -> str:
    return re.sub(r"\{a\} (\S+)", lambda m: f"{_article(m.group(1))} {m.group(1)}", text)


def _fmt_hz(f: float) -> str:
    return str(int(round(f)))


def _pitch(rng, s: Sound, adjective: bool = False) -> str:
    if s.note is not None and not s.freq_named:
        return s.note if adjective else _pick(rng, NOTE_FORMS).format(N=s.note)
    return _pick(rng, HZ_ADJ_FORMS if adjective else HZ_FORMS).format(f=_fmt_hz(s.freq))


def _rate(rng, rate: int) -> str:
    return str(rate) if rng.random() < 0.5 else NUMBER_WORDS[rate - 1]


def _sound_phrase(rng: np.random.Generator, s: Sound, mixture: bool = False) -> str:
    if s.kind == "tone":
        w = f"{_pick(rng, WAVE_WORDS[s.waveform])} {_pick(rng, TONE_NOUNS)}"
        templates = TONE_TEMPLATES[:4] if mixture else TONE_TEMPLATES
        if s.note is not None and not mixture:
            templates = templates + NOTE_ONLY_TONE_TEMPLATES
        t = _pick(rng, templates)
        return t.format(a="{a}", W=w, P=_pitch(rng, s), A=_pitch(rng, s, adjective=True), N=s.note)
    if s.kind == "chord":
        return _pick(rng, CHORD_TEMPLATES).format(a="{a}", N=s.note, Q=s.quality)
    if s.kind == "scale":
        return _pick(rng, SCALE_TEMPLATES).format(a="{a}", N=s.note, D=_pick(rng, DIRECTION_WORDS[s.direction]),
                                                  V=_pick(rng, DIRECTION_VERBS[s.direction]))
    if s.kind == "drums":
        n = str(int(s.bpm))
        return _pick(rng, DRUM_TEMPLATES[:4] if mixture else DRUM_TEMPLATES).format(a="{a}", n=n, B=_pick(rng, BPM_FORMS).format(n=n))
    if s.kind == "noise":
        return _pick(rng, NOISE_TEMPLATES).format(a="{a}", C=_pick(rng, NOISE_WORDS[s.color]))
    if s.kind == "sweep":
        d = _pick(rng, DIRECTION_WORDS[s.direction])
        fields = dict(a="{a}", D=d, S=_pick(rng, SWEEP_NOUNS), V=_pick(rng, DIRECTION_VERBS[s.direction]),
                      U="up" if s.direction == "rising" else "down", F0=_fmt_hz(s.freq), F1=_fmt_hz(s.freq_end))
        return _pick(rng, SWEEP_NAMED_TEMPLATES if s.freq_named else SWEEP_TEMPLATES).format(**fields)
    if s.kind == "clicks":
        n1, ns = CLICK_NOUNS[s.click]
        if rng.random() < 0.3 and s.click == "beep":
            ns = "short beeps"
        times = "once" if s.rate == 1 else f"{_rate(rng, s.rate)} times"
        fields = dict(a="{a}", r=_rate(rng, s.rate), t=times, N1=n1, Ns=ns)
        if s.rate == 1:
            fields["Ns"] = "short beep" if ns == "short beeps" else n1
        if s.click == "beep" and s.freq_named:
            return _pick(rng, BEEP_NAMED_TEMPLATES).format(P=_pitch(rng, s), A=_pitch(rng, s, adjective=True), **fields)
        return _pick(rng, CLICK_TEMPLATES).format(**fields)
    if s.kind == "silence":
        return _pick(rng, SILENCE_TEMPLATES).format(a="{a}")
    raise ValueError(f"make_caption: unknown kind {s.kind!r}")


def make_caption(spec: SynthSpec, rng: np.random.Generator) -> str:
    """One caption for the spec (the phrasing is drawn from rng)."""
    if len(spec.layers) == 1:
        text = _sound_phrase(rng, spec.layers[0])
    else:
        fg = _sound_phrase(rng, spec.layers[0], mixture=True)
        bg = _sound_phrase(rng, spec.layers[1], mixture=True)
        text = _pick(rng, MIXTURE_TEMPLATES).format(X=fg, Y=bg)
    if spec.loudness_stated:
        if rng.random() < 0.5:
            adj = _pick(rng, LOUDNESS_ADJ[spec.loudness])
            text = "{a} " + adj + text[3:] if text.startswith("{a} ") else f"{adj} {text}"
        else:
            text = f"{text} {_pick(rng, LOUDNESS_SUFFIX[spec.loudness])}"
    return _resolve_articles(text)


# --------------------------------------------------------------------------------------------
# tokens

_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])([A-G])(#?)(\d)(?![A-Za-z0-9])|(\d)|([A-Za-z]+)|([^\sA-Za-z0-9])")


def tokenize(text: str) -> list[str]:
    """Caption -> tokens: lower-case words, single digits, punctuation, note names as [letter, "#", octave]
    (letter upper-case, "#" only when sharp)."""
    out: list[str] = []
    for m in _TOKEN_RE.finditer(text):
        if m.group(1):
            out.append(m.group(1))
            if m.group(2):
                out.append("#")
            out.append(m.group(3))
        else:
            out.append((m.group(4) or m.group(5) or m.group(6)).lower())
    return out


def vocabulary() -> list[str]:
    """Every token :func:`tokenize` can produce from a SonicSynth caption, sorted."""
    texts: list[str] = []
    for group in (TONE_NOUNS, TONE_TEMPLATES, NOTE_ONLY_TONE_TEMPLATES, CHORD_TEMPLATES, SCALE_TEMPLATES,
                  BPM_FORMS, DRUM_TEMPLATES, NOISE_TEMPLATES, SWEEP_NOUNS, SWEEP_TEMPLATES, SWEEP_NAMED_TEMPLATES,
                  CLICK_TEMPLATES, BEEP_NAMED_TEMPLATES, SILENCE_TEMPLATES, MIXTURE_TEMPLATES, HZ_FORMS, HZ_ADJ_FORMS,
                  NOTE_FORMS, NUMBER_WORDS, ("major", "minor", "up", "down", "once", "times", "short", "a", "an")):
        texts.extend(group)
    for d in (WAVE_WORDS, DIRECTION_WORDS, DIRECTION_VERBS, NOISE_WORDS, CLICK_NOUNS, LOUDNESS_ADJ, LOUDNESS_SUFFIX):
        for v in d.values():
            texts.extend(v)
    vocab: set[str] = set()
    for t in texts:
        vocab.update(tokenize(re.sub(r"\{\w+\}", " ", t)))
    vocab.update(str(i) for i in range(10))
    vocab.update("ABCDEFG")
    vocab.add("#")
    return sorted(vocab)


# --------------------------------------------------------------------------------------------
# parsing (the oracle generator and the tests use it)

_NUM = r"(\d+)"
_HZ_RE = re.compile(_NUM + r"(?:-| )(?:hz|hertz)\b")
_NOTE_RE = re.compile(r"(?<![A-Za-z0-9])([A-G]#?\d)(?![A-Za-z0-9])")
_BPM_RE = re.compile(_NUM + r" (?:bpm|beats per minute)\b")
_RATE_RE = re.compile(r"\b(once|\w+) (?:(?:short )?(?:clicks?|beeps?) |times )?per second")
_SWEEP_RE = re.compile(r"from " + _NUM + r"(?: hz| hertz)? to " + _NUM + r"(?: hz| hertz)?")


def _loudness(text: str) -> tuple[str | None, str]:
    low = text.lower()
    for level, suffixes in LOUDNESS_SUFFIX.items():
        for s in suffixes:
            if low.endswith(" " + s):
                return level, text[: -len(s) - 1]
    for level, adjs in LOUDNESS_ADJ.items():
        for a in adjs:
            m = re.search(rf"(^|\b(?:a|an) ){a} ", text)
            if m:
                return level, text[: m.start()] + m.group(1) + text[m.end():]
    return None, text


def _direction(low: str) -> str | None:
    for d, words in DIRECTION_WORDS.items():
        if any(re.search(rf"\b{w}\b", low) for w in words + DIRECTION_VERBS[d]):
            return d
    if re.search(r"\bup\b", low):
        return "rising"
    if re.search(r"\bdown\b", low):
        return "falling"
    return None


def _parse_sound(text: str) -> Sound:
    low = text.lower()
    note = _NOTE_RE.search(text)
    hz = _HZ_RE.search(low)
    if re.search(r"\bsilen|\bno sound\b", low):
        return Sound("silence")
    if re.search(r"\b(chord|triad)\b", low):
        if note is None:
            raise ValueError(f"parse_caption: chord without a root note: {text!r}")
        m = note_to_midi(note.group(1))
        return Sound("chord", freq=midi_to_hz(m), note=note.group(1), quality="minor" if "minor" in low else "major",
                     waveform="sine", freq_named=True)
    if re.search(r"\b(scale|melody)\b", low):
        if note is None:
            raise ValueError(f"parse_caption: scale without a start note: {text!r}")
        m = note_to_midi(note.group(1))
        return Sound("scale", freq=midi_to_hz(m), note=note.group(1), direction=_direction(low) or "rising",
                     waveform="sine", freq_named=True)
    if re.search(r"\b(drums?|beat|bpm)\b", low) or "beats per minute" in low:
        b = _BPM_RE.search(low)
        if b is None:
            raise ValueError(f"parse_caption: drums without a tempo: {text!r}")
        return Sound("drums", bpm=float(b.group(1)), pattern="rock")
    if re.search(r"\bnoise\b", low):
        for color, words in NOISE_WORDS.items():
            if any(re.search(rf"\b{w}\b", low) for w in words):
                return Sound("noise", color=color)
        return Sound("noise", color="white")
    if re.search(r"\b(sweep|chirp|sweeping)\b", low):
        ends = _SWEEP_RE.search(low)
        if ends:
            f0, f1 = float(ends.group(1)), float(ends.group(2))
            return Sound("sweep", freq=f0, freq_end=f1, direction="rising" if f1 > f0 else "falling",
                         waveform="sine", freq_named=True)
        d = _direction(low) or "rising"
        f0, f1 = (200.0, 3200.0) if d == "rising" else (3200.0, 200.0)
        return Sound("sweep", freq=f0, freq_end=f1, direction=d, waveform="sine")
    if re.search(r"\b(clicks?|beeps?)\b", low):
        r = _RATE_RE.search(low)
        if r is None:
            raise ValueError(f"parse_caption: clicks without a rate: {text!r}")
        word = r.group(1)
        rate = 1 if word == "once" else int(word) if word.isdigit() else NUMBER_WORDS.index(word) + 1
        if re.search(r"\bbeeps?\b", low):
            return Sound("clicks", rate=rate, click="beep", freq=float(hz.group(1)) if hz else BEEP_DEFAULT_HZ,
                         freq_named=hz is not None, waveform="sine")
        return Sound("clicks", rate=rate, click="click")
    wf = "sine"
    for w, words in WAVE_WORDS.items():
        if any(re.search(rf"\b{x}\b", low) for x in words):
            wf = w
            break
    if hz is not None:
        return Sound("tone", freq=float(hz.group(1)), waveform=wf, freq_named=True)
    if note is not None:
        return Sound("tone", freq=midi_to_hz(note_to_midi(note.group(1))), note=note.group(1), waveform=wf)
    raise ValueError(f"parse_caption: no SonicSynth sound recognised in {text!r}")


def _split_mixture(text: str) -> tuple[str, str] | None:
    if " over " in text:
        a, b = text.split(" over ", 1)
        return a, b
    if " on top of " in text:
        a, b = text.split(" on top of ", 1)
        return a, b
    if text.endswith(" in the background") and " with " in text:
        a, b = text[: -len(" in the background")].rsplit(" with ", 1)
        return a, b
    return None


def parse_caption(text: str, duration: float = 5.0) -> SynthSpec:
    """A SonicSynth caption -> the spec it describes (unstated details get defaults: sine timbre,
    "rock" drums, 1000 Hz beeps, a 200 <-> 3200 Hz sweep, moderate loudness). Raises ValueError when
    the text is not a SonicSynth caption."""
    loud, body = _loudness(text.strip())
    parts = _split_mixture(body)
    layers = tuple(_parse_sound(p) for p in parts) if parts else (_parse_sound(body),)
    if layers[0].kind == "silence":
        return SynthSpec(layers=layers, duration=duration, loudness="moderate", loudness_stated=False, level_db=float("-inf"))
    level = loud or "moderate"
    return SynthSpec(layers=layers, duration=duration, loudness=level, loudness_stated=loud is not None,
                     level_db=LOUDNESS_DB[level])

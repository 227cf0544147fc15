"""SonicSynth: a procedural text-audio dataset with exact ground truth (issue 6).

``SonicSynth(split, sample_rate=16000, duration=(1, 5), seed=0)`` is a map-style dataset whose item
``i`` depends only on (seed, split, i); ``write_synth(out_dir, n)`` writes WAVs and a manifest.
``vocabulary()`` / ``tokenize()`` give a text encoder the caption tokens and number conventions;
``parse_caption()`` maps a caption back to its spec. Modules: ``spec`` (attributes, held-out
values, sampling), ``sounds`` (rendering), ``captions`` (phrasings), ``dataset``.
"""
from pysonic.data.synth.captions import make_caption, parse_caption, tokenize, vocabulary
from pysonic.data.synth.dataset import SonicSynth, item_rng, render_item, synth_collate, write_synth
from pysonic.data.synth.sounds import active_level_db, render_spec
from pysonic.data.synth.spec import (HELDOUT_BPM, HELDOUT_PITCH_TOL, HELDOUT_PITCHES, KINDS, LOUDNESS_DB, Sound,
                                     SynthSpec, is_heldout_bpm, is_heldout_pitch, sample_spec, spec_is_heldout)

__all__ = [
    "SonicSynth", "write_synth", "synth_collate", "render_item", "item_rng", "make_caption", "parse_caption", "tokenize", "vocabulary",
    "render_spec", "active_level_db", "Sound", "SynthSpec", "sample_spec", "spec_is_heldout", "is_heldout_pitch",
    "is_heldout_bpm", "KINDS", "LOUDNESS_DB", "HELDOUT_PITCHES", "HELDOUT_PITCH_TOL", "HELDOUT_BPM",
]

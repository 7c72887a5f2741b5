"""The TTS track's core: a tiny FastSpeech2Conformer TTS, its LoRA adapter jobs, and the stop-loss.

- ``acoustics``: the frames the TTS predicts (the ASR front end's log-mel), the Griffin-Lim vocoder,
  mel-cepstral distortion after DTW;
- ``align``: character durations from the base ASR's CTC forced alignment;
- ``model`` / ``data``: the model directory (HF config + weights, vocabulary, statistics) and the
  training rows;
- ``pretrain``: ``pretrain_tts_base`` on the base dialect;
- ``training``: ``train_tts_adapter``, timeboxed and exactly resumable like ASR adapter jobs (the
  same ``TrainState``, ``SampleStream``, ``Timebox`` and checkpoint writers);
- ``judge``: ``synthesize``, the pinned frozen judge ASR (never the candidate), ``back_recognize``,
  and the two gates (``tts_gates``).

No Dagster imports here; docs/tts.md has the measurements and what the Dagster wiring still needs.
"""

"""Candidates of the sparse codec for ``compression.py --runs`` (variants of ``TopKCodec``, not library built-ins).

``compression.py`` registers them in its own process and, when a run uses one, puts this folder on ``PYTHONPATH``, so
that Python imports this file (``sitecustomize``) at the start of each training process and they are registered there
too.
"""

from lightning_localsgd.engine.codecs import TopKCodec, register_codec

#: name -> ``TopKCodec`` options (otherwise topk's: chunks of 4096, k = 64, 2-bit values, β = 0.95, packed indices,
#: ``aggregate="mean"``)
CANDIDATES = {
    "topk_senders": dict(aggregate="senders"),
    "topk_b90": dict(feedback_decay=0.9),
    "topk96_ef": dict(k=96, indices="elias-fano"),
    "topk96_ef_senders": dict(k=96, indices="elias-fano", aggregate="senders"),
    "topk128_ef": dict(k=128, indices="elias-fano"),
    "topk128_ef_senders": dict(k=128, indices="elias-fano", aggregate="senders"),
}

for _name, _options in CANDIDATES.items():
    register_codec(_name, TopKCodec(**_options), override=True)

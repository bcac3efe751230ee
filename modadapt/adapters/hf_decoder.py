"""Old path of the Hugging Face decoder adapter, now `modadapt.adapters.hf.decoder`; its names keep
working from here for one release, with a DeprecationWarning."""

from ..deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        "HFDecoderAdapter": "modadapt.adapters.hf.decoder:HFDecoderAdapter",
        "TESTED_FAMILIES": "modadapt.adapters.hf.decoder:TESTED_FAMILIES",
        "use_attention": "modadapt.adapters.hf.attention:use_attention",
    },
)

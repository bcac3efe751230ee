"""Old path of the LLaVA adapter, now `modadapt.adapters.hf.llava`; its names keep working from here
for one release, with a DeprecationWarning."""

from ..deprecation import moved_names

__getattr__ = moved_names(
    __name__,
    {
        name: f"modadapt.adapters.hf.llava:{name}"
        for name in (
            "IGNORE_INDEX",
            "INFERENCE_TEXT",
            "PROTECT",
            "ROUTE",
            "LlavaAdapter",
            "image_token_id",
            "role_stats",
        )
    },
)

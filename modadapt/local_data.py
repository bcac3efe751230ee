"""`datasets` builders over local files, without datasets' "Downloading data" bars.

`datasets.load_dataset("imagefolder", data_dir=...)` (and ``parquet`` / ``arrow`` with local
``data_files``) "downloads" each local file, which only resolves its path in place, behind a
"Downloading data: 100%|...| N files" bar (shown from 16 files on). `load_local` runs the same
builder with a download manager that turns datasets' progress bars off while it resolves the
files, and only then: the "Generating ... split" bars of the real work stay, and nothing is
hidden from datasets' logging, its warnings or its errors.
"""

from __future__ import annotations

from typing import Any


def load_local(builder: str, split: str | None = None, **kwargs: Any) -> Any:
    """``datasets.load_dataset(builder, split=split, **kwargs)`` for local files (see above)."""
    import datasets

    instance = datasets.load_dataset_builder(builder, **kwargs)
    manager = _quiet_download_manager()(
        dataset_name=instance.dataset_name,
        data_dir=instance.config.data_dir,
        base_path=instance.base_path,
        record_checksums=False,
        download_config=datasets.DownloadConfig(),
    )
    instance.download_and_prepare(dl_manager=manager)
    return instance.as_dataset(split=split)


def _quiet_download_manager() -> type:
    import datasets

    class QuietDownloadManager(datasets.DownloadManager):
        """Resolves local files with datasets' progress bars off (they report no download)."""

        def download(self, url_or_urls):
            if datasets.are_progress_bars_disabled():
                return super().download(url_or_urls)
            datasets.disable_progress_bars()
            try:
                return super().download(url_or_urls)
            finally:
                datasets.enable_progress_bars()

    return QuietDownloadManager

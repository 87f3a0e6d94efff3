"""The data of the ko_constitution_cloze task, found next to this file (whatever the working directory)."""

from pathlib import Path


def load(**kwargs):
    import datasets

    data = Path(__file__).with_name("ko_constitution_cloze.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(data)})

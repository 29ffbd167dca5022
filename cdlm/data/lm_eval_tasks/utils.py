"""``process_docs`` for cdlm_hellaswag.yaml: lm-eval's hellaswag rendering, from cdlm's one copy of it."""

from cdlm.eval_harness.tasks.hellaswag import process_doc


def process_docs(dataset):
    return dataset.map(lambda row, index: process_doc(row, f"cdlm_hellaswag row {index + 1}"), with_indices=True)

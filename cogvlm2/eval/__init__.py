"""Evaluation: CogVLM2 on the published benchmarks through the engine, scored with the official metrics.

Sits on top (imports engine, processing, cli helpers); nothing imports it back. Files:

    vqa_accuracy.py   TextVQA / VQA answer normalisation and the 10-annotator soft accuracy
    metrics.py        ANLS (DocVQA, InfographicVQA), relaxed accuracy (ChartQA), OCRBench's rule
    choice.py         multiple choice: prompt, option extraction, circular rotations (MMBench)
    data.py           benchmark files: JSON / TSV / Parquet rows and their images
    tasks.py          the tasks: row -> item, prompt, per-item score
    summary.py        a run's summary table (overall, per category)
    runner.py         selection (--limit / --seed), resumable generation, output files
    backend.py        the engine as the answer generator
    loglikelihood.py  log-probabilities of continuations (lmms-eval's loglikelihood requests)
    lmms_plugin.py    the lmms-eval model class (`lmms-eval --model cogvlm2`)
    cli.py            `cogvlm2 eval`
"""

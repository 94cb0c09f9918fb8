"""Export: a trained mm1 model out of mm1 (`mm1 export RUN OUT --format hf`).

hf_layout.py   which transformers architecture an mm1 model maps onto exactly, or why none does
hf_weights.py  mm1 parameter names -> the names a transformers LLaVA checkpoint uses
hf_files.py    config.json, tokenizer, processor and generation files of the folder
hf_remote.py   the modeling file written beside connectors LLaVA lacks (trust_remote_code)
hf.py          the export itself: checkpoint in, folder out
command.py     the CLI subcommand
"""

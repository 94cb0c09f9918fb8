"""Readers for benchmarks in the layouts their authors release, one registered format each.

| format       | test / train source                                              | kind    | metric            |
|--------------|------------------------------------------------------------------|---------|-------------------|
| textvqa      | TextVQA_0.5.1_val.json (`{"data": [...]}`), images `{image_id}.jpg` | vqa  | VQA accuracy      |
| vizwiz       | val.json (a list; `answers` with confidences, `answer_type`)      | vqa     | VQA accuracy      |
| gqa          | *_balanced_questions.json (`{qid: {imageId, question, answer}}`) | vqa     | exact match       |
| pope         | coco_pope_{random,popular,adversarial}.json (JSON lines) | vqa     | POPE F1 (+ acc, P, R, yes-ratio) |
| textcaps     | TextCaps_0.1_val.json (`{"data": [...]}` with `reference_strs`)  | caption | CIDEr-D           |
| nocaps       | nocaps_val_4500_captions.json (COCO layout + `domain`)           | caption | CIDEr-D (+ per domain) |
| scienceqa    | problems.json (the questions with an image: ScienceQA-IMG)       | mc      | accuracy          |
| seed_bench   | SEED-Bench.json (image questions), images in SEED-Bench-image/   | mc      | accuracy          |
| mmmu         | parquet file or folder of them (one per subject)                | mc      | MMMU (choice + open rule) |
| mmbench      | MMBench TSV (base64 images)                                      | mc      | CircularEval      |
"""

from mm1.eval.benchmarks import captions, choices, mmmu, vqa  # noqa: F401  (registration)

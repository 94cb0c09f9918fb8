"""The synthetic world: a seeded procedural multimodal corpus written in real on-disk formats.

`build_world(out, size="tiny", seed=0)` writes (paths relative to `out`; image paths inside JSON
files are relative to the folder of that JSON file):

    caption/shard-000000.tar ...     WebDataset / img2dataset layout, 1000 samples per shard:
                                     KEY.png (RGB, 128 px), KEY.txt (short noisy alt-text),
                                     KEY.json {"key", "caption" (= alt), "alt", "dense" (complete
                                     synthetic description), "width", "height", "scene" (objects
                                     with shape/colour/size/position/label, background), "tags"
                                     (image-level labels: the shapes, their colours, their place
                                     words, the object count as a word; `language.scene_tags`)}
    interleaved/part-00000.parquet   OBELICS layout: columns id: string, texts: list<string>,
                                     images: list<binary> (PNG bytes); exactly one of texts[i],
                                     images[i] is non-null; 2-10 images per document, text that
                                     refers to them (captions, Q/A lines, comparisons, lists)
    text/train.jsonl                 {"id", "text"}: facts that only text carries (invented names
                                     of object kinds, point values, corners, arithmetic)
    sft/train.json, sft/images/      LLaVA format: [{"id", "image": "images/x.png" | [paths],
                                     "conversations": [{"from": "human"|"gpt", "value"}]}]
    eval/caption_{train,test}.json   COCO captions: images [{id, file_name, width, height}],
                                     annotations [{id, image_id, caption}], 5 references per image
    eval/vqa_{split}_questions.json  VQAv2: {"questions": [{question_id, image_id, question, file_name}]}
    eval/vqa_{split}_annotations.json  VQAv2: {"annotations": [{question_id, image_id, question_type
                                     (colour|shape|count|position|label|yes/no), answer_type,
                                     multiple_choice_answer, answers: 10 x {answer,
                                     answer_confidence, answer_id}}]}
    eval/mc_{split}.jsonl            {"id", "image", "question", "options": [...], "answer": index,
                                     "question_type"}
    eval/multi_{split}.jsonl         {"id", "images": [a, b], "question", "answer", "question_type"}
    eval/text_{split}.jsonl          {"id", "question", "answer"} about the text-only facts
    eval/text_docs_test.jsonl        {"id", "text"}: held-out text documents (perplexity); kept out
                                     of text/ so that a reader given that folder never trains on them
    eval/images/                     {split}_NNNNNN.png (caption/VQA/MC pool), multi_{split}_NNNNNN_{a,b}.png
    tokenizer.json                   byte-level BPE trained on the world's training text
                                     (ids 0-5: <pad> <s> </s> <image> <|im_start|> <|im_end|>)
    world.json                       manifest: generator_version, size, seed, spec, counts, bytes, files

The same seed gives byte-identical files; no eval test image appears in any training part.
"""

from mm1.data.world.build import GENERATOR_VERSION, WORLD_SIZES, WorldSize, build_world, ensure_world

__all__ = ["GENERATOR_VERSION", "WORLD_SIZES", "WorldSize", "build_world", "ensure_world"]

"""Teacher prompts for the three response types of the paper's section 3, with our own seed examples.

Each request is: a system message describing the task and the reply format, then the seed examples as
(user: image context, assistant: the reply we want) pairs — in-context examples, as the paper uses — then the
user message with the new image's context (`coco.ImageContext.text()`).

Reply formats (parsed by `datagen.parse`):
  conversation, complex: blocks separated by a line '===': 'Question:' then the question, 'Answer:' then the
    answer, alternating, starting with a question (complex: exactly one pair);
  detail: the description itself (the human turn is one of DETAIL_INSTRUCTIONS).
The seed examples below were written for this project (scenes and wording are ours).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

TYPES = ("conversation", "detail", "complex")

_NO_LEAK = ("Speak as if you were looking at the image yourself: never mention captions, descriptions, "
            "coordinates or bounding boxes, and do not use the numbers of the coordinates in your replies.")

SYSTEM = {
    "conversation": (
        "You are an AI visual assistant looking at a single image. What you see is given to you as several "
        "sentences describing the image and as a list of objects with their locations, each written as "
        "name: [x1, y1, x2, y2], the top-left and bottom-right corners as fractions of the image width and "
        "height.\n"
        "Write a conversation between a person asking about this image and you answering. Ask about what is in "
        "the picture: object types, how many there are, what they are doing, where they are relative to each "
        "other, and questions that need some reasoning or background knowledge to answer. Only ask questions "
        "whose answers can be told with confidence from the image; leave out anything uncertain. Answers "
        "should be natural, helpful and in full sentences. " + _NO_LEAK + "\n"
        "Format: each question starts with a line 'Question:' and each answer with a line 'Answer:', and the "
        "blocks are separated by a line containing only '==='. Write three to five question and answer pairs."),
    "detail": (
        "You are an AI visual assistant looking at a single image. What you see is given to you as several "
        "sentences describing the image and as a list of objects with their locations, each written as "
        "name: [x1, y1, x2, y2], the top-left and bottom-right corners as fractions of the image width and "
        "height.\n"
        "Describe the image in rich detail: the scene, the objects and people, their attributes, counts and "
        "positions relative to one another, and what seems to be happening. Describe only what can be told "
        "with confidence. " + _NO_LEAK + "\n"
        "Reply with the description only, as one or two paragraphs."),
    "complex": (
        "You are an AI visual assistant looking at a single image. What you see is given to you as several "
        "sentences describing the image and as a list of objects with their locations, each written as "
        "name: [x1, y1, x2, y2], the top-left and bottom-right corners as fractions of the image width and "
        "height.\n"
        "Ask one question about the image that cannot be answered by simply naming what is visible: it should "
        "need reasoning about the scene, for example about causes, purposes, consequences, safety or what "
        "might happen next, possibly with some background knowledge. Then answer it carefully, step by step, "
        "with the evidence from the image. " + _NO_LEAK + "\n"
        "Format: a line 'Question:' followed by the question, a line containing only '===', then a line "
        "'Answer:' followed by the answer."),
}

# Our own examples. Contexts use the same layout as coco.ImageContext.text().
SEEDS: Dict[str, List[Tuple[str, str]]] = {
    "conversation": [
        ("Two children build a sandcastle near the water.\n"
         "A boy and a girl play with buckets on a sandy beach.\n"
         "Kids kneeling in the sand next to a small castle.\n"
         "A red bucket and a yellow shovel lie beside a sandcastle.\n"
         "Children at the seaside on a sunny day.\n\n"
         "person: [0.120, 0.410, 0.330, 0.880]\n"
         "person: [0.560, 0.380, 0.790, 0.900]\n"
         "umbrella: [0.700, 0.020, 0.990, 0.350]",
         "Question:\nHow many children are in the picture?\n===\nAnswer:\nThere are two children in the "
         "picture, a boy and a girl, both kneeling in the sand.\n===\nQuestion:\nWhat are the children doing?\n"
         "===\nAnswer:\nThey are building a sandcastle together, using a red bucket and a yellow shovel to shape "
         "the sand.\n===\nQuestion:\nWhere is the umbrella?\n===\nAnswer:\nThe beach umbrella stands in the "
         "upper right part of the scene, behind the girl, giving some shade on a sunny day.\n===\nQuestion:\n"
         "Why might the children have chosen to build close to the water?\n===\nAnswer:\nSand near the water "
         "is damp, and damp sand sticks together much better than dry sand, so it holds the shape of walls and "
         "towers. That makes it the easiest place on a beach to build a sandcastle."),
        ("A woman reads a book on a park bench.\n"
         "A person sitting on a wooden bench under a tree.\n"
         "A lady with a book and a dog lying at her feet.\n"
         "A brown dog rests beside a bench in a park.\n"
         "Someone relaxing outdoors with a novel.\n\n"
         "person: [0.350, 0.220, 0.610, 0.780]\n"
         "bench: [0.200, 0.450, 0.850, 0.820]\n"
         "dog: [0.620, 0.700, 0.880, 0.950]\n"
         "book: [0.440, 0.400, 0.530, 0.520]",
         "Question:\nWhat is the woman doing?\n===\nAnswer:\nShe is sitting on a wooden park bench and reading "
         "a book.\n===\nQuestion:\nIs there an animal in the image?\n===\nAnswer:\nYes, a brown dog is lying "
         "on the ground at the right end of the bench, near the woman's feet.\n===\nQuestion:\nWhat does the "
         "scene suggest about the mood of the moment?\n===\nAnswer:\nThe scene feels calm and relaxed: the "
         "woman is absorbed in her book in the shade of a tree while her dog rests quietly beside her, which "
         "suggests a slow, peaceful afternoon in the park."),
    ],
    "detail": [
        ("A cyclist rides along a city street.\n"
         "A man on a bicycle passes parked cars.\n"
         "A person wearing a helmet bikes down the road.\n"
         "A street with shops, cars and a cyclist.\n"
         "A bicycle rider in traffic near storefronts.\n\n"
         "person: [0.410, 0.300, 0.560, 0.760]\n"
         "bicycle: [0.380, 0.520, 0.600, 0.900]\n"
         "car: [0.000, 0.550, 0.250, 0.850]\n"
         "car: [0.700, 0.580, 0.980, 0.870]\n"
         "traffic light: [0.850, 0.050, 0.900, 0.250]",
         "The image shows a city street with a man riding a bicycle down the middle of the scene. He wears a "
         "helmet and is pedalling past two parked cars, one on the left edge of the picture and one on the "
         "right. Shops line the street in the background, and a traffic light hangs high in the upper right "
         "corner. The cyclist appears to be sharing the road with the traffic as he makes his way through "
         "town."),
        ("A plate of pasta with tomato sauce on a table.\n"
         "A dinner table set with a meal and a glass of water.\n"
         "Spaghetti topped with basil next to a fork.\n"
         "A simple meal served on a white plate.\n"
         "Food on a wooden table beside a drink.\n\n"
         "dining table: [0.000, 0.300, 1.000, 1.000]\n"
         "bowl: [0.200, 0.400, 0.700, 0.850]\n"
         "fork: [0.720, 0.450, 0.800, 0.900]\n"
         "cup: [0.800, 0.200, 0.950, 0.500]",
         "A home-cooked meal sits on a wooden dining table. In the centre is a white plate of spaghetti with "
         "red tomato sauce, garnished with a few green basil leaves. A fork lies to the right of the plate, "
         "ready to be picked up, and a glass of water stands further back on the right side of the table. The "
         "table fills the lower part of the picture, and the simple arrangement gives the scene a cosy, "
         "everyday feel."),
    ],
    "complex": [
        ("A man stands on a ladder next to a house.\n"
         "Someone cleaning the gutters of a two-storey home.\n"
         "A person on a tall ladder leaning against a roof.\n"
         "A ladder propped against a house with a man on top.\n"
         "Home maintenance on a cloudy day.\n\n"
         "person: [0.450, 0.100, 0.580, 0.450]\n"
         "ladder: [0.430, 0.150, 0.560, 1.000]",
         "Question:\nWhat precautions should the man take while doing this work?\n===\nAnswer:\nThe man is "
         "working high up on a tall ladder leaning against the house, so falling is the main risk. The ladder "
         "should stand on firm, level ground at a safe angle, ideally with someone holding its base. He should "
         "keep three points of contact with the ladder, avoid leaning out to the side to reach further, and "
         "move the ladder instead. Since the day is cloudy, he should also watch for rain, which would make "
         "the rungs and the roof edge slippery."),
        ("A group of people hold umbrellas at a bus stop.\n"
         "Commuters wait in the rain for a bus.\n"
         "Several people with umbrellas stand on a wet sidewalk.\n"
         "A bus approaches a crowded stop on a rainy day.\n"
         "People sheltering from the rain near the road.\n\n"
         "person: [0.100, 0.350, 0.220, 0.900]\n"
         "person: [0.250, 0.330, 0.380, 0.920]\n"
         "person: [0.400, 0.360, 0.520, 0.910]\n"
         "umbrella: [0.050, 0.200, 0.300, 0.400]\n"
         "umbrella: [0.330, 0.180, 0.580, 0.380]\n"
         "bus: [0.650, 0.250, 1.000, 0.850]",
         "Question:\nWhy might the people be standing so close together?\n===\nAnswer:\nIt is raining, and "
         "the people are waiting at a bus stop with umbrellas. Standing close together lets them share the "
         "little shelter that the stop and their umbrellas give, and it keeps them at the edge of the sidewalk "
         "so they can board quickly. The bus is just arriving on the right, so they have probably gathered "
         "in anticipation of getting on."),
    ],
}

# The human turn of a detailed-description sample (our own phrasings; one is picked per image).
DETAIL_INSTRUCTIONS = (
    "Describe this image in detail.",
    "What is going on in this picture? Please describe it thoroughly.",
    "Give a detailed description of the scene shown in the image.",
    "Can you walk me through everything you see in this photo?",
    "Write a detailed account of what the image shows.",
    "Please explain in detail what this picture contains.",
    "Tell me about this image, describing its contents carefully.",
    "Provide a thorough description of the photograph.",
)


def build_messages(kind: str, context: str, seeds: Sequence[Tuple[str, str]] = None) -> List[Dict[str, str]]:
  """The chat request for one image and response type `kind` ('conversation' | 'detail' | 'complex')."""
  if kind not in TYPES:
    raise ValueError(f"response type {kind!r}; choose one of {TYPES}")
  if not isinstance(context, str) or not context.strip():
    raise ValueError("the image context is empty")
  seeds = SEEDS[kind] if seeds is None else seeds
  messages = [{"role": "system", "content": SYSTEM[kind]}]
  for ctx, reply in seeds:
    messages += [{"role": "user", "content": ctx}, {"role": "assistant", "content": reply}]
  messages.append({"role": "user", "content": context})
  return messages

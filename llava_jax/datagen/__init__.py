"""Training-data generation: GPT-assisted instruction data from COCO (the paper's section 3) and the ScienceQA
converter that writes LLaVA JSON. See generate.py, prompts.py, parse.py, coco.py, scienceqa.py."""

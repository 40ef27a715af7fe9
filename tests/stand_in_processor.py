"""`orpo` with the tests' Qwen2-VL processor (tests/vision_models.py: `family_processor`) in place of the one saved
with the model, for tests/test_recipes.py's Qwen2-VL recipe in its plain-install venv: the model's own processor
loads a video processor, which needs torchvision, and torchvision's PyPI wheels are CUDA builds that do not load
beside this project's CPU torch ("operator torchvision::nms does not exist"). Everything else is orpo's CLI.

`python tests/stand_in_processor.py train --config RECIPE ...`
"""
import sys

if __name__ == "__main__":
    from orpo.commands.cli import main
    from orpo.run import setup
    from vision_models import family_processor  # beside this file: on sys.path as the script's directory

    setup.load_tokenizer = lambda path, trust_remote_code=False: family_processor("qwen2_vl")
    sys.exit(main(sys.argv[1:]))

"""python -m r1jax.recipe RECIPE.yaml [key=value ...]: run the R1 recipe (see r1jax.recipe)."""

import logging
import sys

from r1jax.config import ConfigError
from r1jax.data.sources import DataError
from r1jax.recipe import RecipeError, load_recipe, run


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = load_recipe(argv[0], *argv[1:])
        run(recipe)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (RecipeError, DataError, FloatingPointError) as e:
        print(f"recipe stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

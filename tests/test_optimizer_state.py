"""The planner's optimizer state (``memory/optimizer_state.py``) against each optimizer's real state after a step."""

import pytest
import torch
from accelerate.utils import DistributedType

from lora_ft.memory.estimate import static_rows
from lora_ft.memory.optimizer_state import MIN_8BIT_SIZE, tensor_state_bytes
from lora_ft.memory.shape import model_shape, setting_for
from lora_ft.modeling.adapters import attach_adapters
from lora_ft.modeling.loading import load_model
from lora_ft.recipe import Recipe
from lora_ft.training.param_groups import make_optimizer

OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "adafactor", "sgd"]


def state_storage_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages in the optimizer's state (shared code books once)."""
    seen = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)}
    return sum(seen.values())


@pytest.fixture(scope="module")
def bert_r64(tiny_bert):
    """The tiny BERT classifier with LoRA r=64 and the gradients of one batch: (recipe, model, heads).

    r=64 on a 64-wide BERT: A of the 64→64 layers holds 4,096 values (bitsandbytes' 8-bit state), the key/value B
    and the head fewer (32-bit state): both paths, and the head's own row of the plan."""
    recipe = Recipe.model_validate({"model": {"name": str(tiny_bert), "task": "sequence_classification",
                                              "compute_dtype": "fp32"}, "lora": {"r": 64, "dropout": 0.0}})
    loaded = load_model(recipe.model, "fp32", id2label={0: "a", 1: "b"})
    model = attach_adapters(loaded.model, recipe.lora, "sequence_classification", loaded.head_modules, False)
    ids = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    return recipe, model, loaded.head_modules


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_planners_optimizer_state_equals_the_optimizers_real_state_after_a_step(bert_r64, name):
    recipe, model, heads = bert_r64
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": name})})
    optimizer = make_optimizer(model, recipe.train.model_copy(update={"lr": 1e-3, "head_lr": None}), heads,
                               DistributedType.NO)
    optimizer.step()
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    assert min(sizes) < MIN_8BIT_SIZE <= max(sizes)  # both paths are exercised

    rows = static_rows(model_shape(recipe), setting_for(recipe, "cpu"))
    trained = [r.bytes for r in rows if r.label.startswith(("LoRA weights", "new task head"))]
    planned_state = sum(trained) - 8 * sum(sizes)  # the rows hold weights and gradients (fp32) besides the state
    assert len(trained) == 2 and planned_state == state_storage_bytes(optimizer)


def test_eight_bit_state_is_about_a_quarter_of_adamws_and_adafactor_factors_a_matrix():
    big = (16, 576)  # LoRA A of a 576-wide model at r=16
    assert tensor_state_bytes("adamw_8bit", big) / tensor_state_bytes("adamw", big) == pytest.approx(0.25, abs=0.01)
    assert tensor_state_bytes("adamw_8bit", (8, 64)) == 8 * 8 * 64  # under min_8bit_size: fp32 moments
    assert tensor_state_bytes("adafactor", big) == 4 * (16 + 576) + 4
    assert tensor_state_bytes("lion_8bit", big) * 2 == tensor_state_bytes("adamw_8bit", big)

"""The base of every recipe section: strict keys, validated assignments."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf/.nan are floats, and no field of a recipe means anything infinite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

"""Teacher registry, checkpoint converters and builders."""

from teachers.build import TeacherWeightsError, build_teacher_model
from teachers.convert import CheckpointFormatError, convert_state_dict, load_weights_file
from teachers.registry import TEACHERS, TeacherSpec, get_spec

__all__ = [
    "TEACHERS", "TeacherSpec", "get_spec", "build_teacher_model", "TeacherWeightsError",
    "CheckpointFormatError", "convert_state_dict", "load_weights_file",
]

"""Representation alignment: frozen teachers, the REPA projector and loss."""

from gear.align.repa import Projector, repa_loss
from gear.align.teachers import TEACHERS, Teacher, build_teacher

__all__ = ["TEACHERS", "Projector", "Teacher", "build_teacher", "repa_loss"]

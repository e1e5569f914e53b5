"""The OOM doctor: plan, run under the monitor, attribute, diagnose, fix, report."""

from kvscope.doctor.doctor import DoctorResult, doctor

__all__ = ["DoctorResult", "doctor"]

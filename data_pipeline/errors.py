"""User-facing errors. The CLI prints these as one line; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class VTDInputError(ValueError):
    """Bad user input: a dataset file, a config, a metrics file, a checkpoint."""


class DataError(VTDInputError):
    """A problem with one file of the dataset, located by file, frame and field.

    ``str(err)`` reads ``<file>: frame <frame>: <field>: <message>`` with absent parts left out.
    """

    def __init__(self, file: str, message: str, *, frame: str | None = None, field: str | None = None):
        self.file, self.frame, self.field, self.message = str(file), frame, field, message
        parts = [self.file]
        if frame is not None:
            parts.append(f"frame {frame}")
        if field is not None:
            parts.append(field)
        parts.append(message)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # survives pickling across process pools
        return (_rebuild_data_error, (self.file, self.message, self.frame, self.field))


def _rebuild_data_error(file, message, frame, field):
    return DataError(file, message, frame=frame, field=field)

"""Help pages that read well: `tidy(app)`, once every command is registered, unwraps the docstrings' hard
line breaks (rich would keep them in the commands list) and shows flags without a `<bool>` type.

A flag takes no value, so typer's type column has nothing to say about it; the metavar is the documented way
to set that column, and it is set only where the help page is drawn.
"""
from __future__ import annotations

import inspect

import typer
from typer.core import TyperCommand, TyperGroup
from typer.models import DefaultPlaceholder


def unwrap(text: str) -> str:
    """Each paragraph on one line; paragraphs (blank-line separated) stay apart."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def _flags_without_type(command, ctx) -> None:
    for param in command.get_params(ctx):
        if getattr(param, "is_bool_flag", False) and param.metavar is None:
            param.metavar = ""


class Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        _flags_without_type(self, ctx)
        super().format_help(ctx, formatter)


class Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        _flags_without_type(self, ctx)
        super().format_help(ctx, formatter)


def _plain(cls, default) -> bool:
    """Not set, or typer's own default: ours subclass those, so a more special class someone chose is kept."""
    return cls is None or cls is default or isinstance(cls, DefaultPlaceholder)


def tidy(app: typer.Typer) -> None:
    if _plain(app.info.cls, TyperGroup):
        app.info.cls = Group
    if isinstance(app.info.help, str):
        app.info.help = unwrap(app.info.help)
    for info in app.registered_commands:
        doc = info.help if info.help is not None else inspect.getdoc(info.callback)
        if doc:
            info.help = unwrap(doc)
        if _plain(info.cls, TyperCommand):
            info.cls = Command
    for group in app.registered_groups:
        if _plain(group.cls, TyperGroup):
            group.cls = Group
        if isinstance(group.help, str):
            group.help = unwrap(group.help)
        tidy(group.typer_instance)

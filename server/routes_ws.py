"""Placeholder: replaced by the adapter implementation."""

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    pass

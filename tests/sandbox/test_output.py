"""The shared output file: what the worker writes, the host reads back, held to its size, and
a hostile length cannot make the host read past it."""

from __future__ import annotations

import os
import struct

import pytest

from workerloader.sandbox._output import (
    SIZE,
    OutputWriter,
    new_output_file,
    read_output,
)


def test_the_host_reads_the_lines_of_the_latest_call() -> None:
    fd = new_output_file()
    try:
        writer = OutputWriter(fd)
        writer.write("one\ntw")
        writer.write("o\n")
        assert read_output(fd) == ["one", "two"]
        writer.reset()
        writer.write("three")
        assert read_output(fd) == ["three"]
    finally:
        os.close(fd)


def test_output_past_the_file_is_cut_and_a_lying_length_is_clamped() -> None:
    fd = new_output_file()
    try:
        writer = OutputWriter(fd)
        writer.write("x" * (2 * SIZE))
        (line,) = read_output(fd)
        assert len(line) == SIZE - 4
        os.pwrite(fd, struct.pack("<I", 2**32 - 1), 0)  # what a hostile worker could write
        assert len(read_output(fd)[0]) == SIZE - 4
    finally:
        os.close(fd)


def test_the_file_cannot_be_resized_under_the_workers_mapping() -> None:
    fd = new_output_file()
    try:
        for size in (0, 2 * SIZE):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
    finally:
        os.close(fd)

"""Classroom tools: student kits with exercises blanked out, and a grader (see lessons/README.md).

- :mod:`minitune.classroom.kit`: find the ``# BEGIN EXERCISE NN.M`` regions, write a student copy.
- :mod:`minitune.classroom.grade`: run each exercise's tests, print a table, write ``results.json``.
- :mod:`minitune.classroom.lesson`: small helpers the lessons' ``run.py`` scripts share.
- :mod:`minitune.classroom.tiny_sft`: lesson 05's SFT run and evaluation, the measuring stick of lessons 06-09.
"""

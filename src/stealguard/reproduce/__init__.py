"""Reproduce the papers' tables and figures: specs -> cells -> run store -> tables and plots."""

"""Every suite of `python -m bench`, and the jobs of a run in the order it takes them.

    built in (plan.py)  attention, memory, softmax, modules, overhead
    registered          serving, decode (early: right after the attention sweep), then window, varlen, mods,
                        fp8, mla, hf

A registered suite is one module that describes itself in a
bench/registry.py `Suite` when it is imported. This file is the one list of
them: adding a suite is one module and one entry in ORDER.
"""
from . import (decode_suite, hf_suite, lowprec_suite, mods_suite, plan, registry, serving_suite, varlen_suite,
               window_suite)

mods_suite.register()
lowprec_suite.register()
# The order of a run and of the reports: issue 17's serving targets first, then the decode sweep.
ORDER = (serving_suite.SUITE, decode_suite.SUITE, window_suite.SUITE, varlen_suite.SUITE, mods_suite.SUITE,
         lowprec_suite.FP8_SUITE, lowprec_suite.MLA_SUITE, hf_suite.SUITE)
registry.arrange(list(ORDER))

NAMES = plan.SUITES + tuple(registry.SUITES)


def build_jobs(args, device_type):
    """Every job of the run, in order, and the built-in suites' preset: see plan.py's docstring for the order."""
    early, late = [], []
    for suite in registry.SUITES.values():
        (early if suite.early else late).extend(suite.build_jobs(args, device_type))
    jobs, preset = plan.build_jobs(args, device_type, after_attention=early)
    return jobs + late, preset


def summaries(records):
    """The registered suites' summaries of these rows, the empty ones left out."""
    texts = (suite.summary(records) for suite in registry.SUITES.values() if suite.summary is not None)
    return "\n\n".join(text for text in texts if text)

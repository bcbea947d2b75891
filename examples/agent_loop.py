"""A scripted agent loop on the petri SDK: no model, a fixed list of the steps a model would
take. It creates a sandbox, runs the steps one after the other (the state carries over), reacts
to an error by running a fix, fetches the report the code wrote, and deletes the sandbox.

Run: pip install ./client, then PETRI_ADDR=host:port python examples/agent_loop.py
(and PETRI_TOKEN, PETRI_PROJECT if the service wants them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import petri


@dataclass(frozen=True)
class Step:
    thought: str  # what the "model" says it is doing
    code: str  # the code it asks to run


# What a model would answer, turn by turn. The second step has a typo in a column name.
PLAN = [
    Step(
        "Load the sales data.",
        "import pandas as pd\n"
        "sales = pd.DataFrame({\n"
        "    'region': ['north', 'south', 'north', 'east', 'south'],\n"
        "    'revenue': [120, 80, 200, 50, 95],\n"
        "})\n"
        "len(sales)",
    ),
    Step(
        "Total the revenue per region.",
        "totals = sales.groupby('region')['revnue'].sum()\ntotals",
    ),
    Step(
        "Write the report.",
        "with open('report.md', 'w') as f:\n"
        "    f.write('# Revenue by region\\n\\n')\n"
        "    for region, total in totals.sort_values(ascending=False).items():\n"
        "        f.write(f'- {region}: {total}\\n')\n"
        "print('report written')",
    ),
]

# How the "model" reacts to an error it sees, by the exception's name.
FIXES = {
    "KeyError": Step(
        "The column is called 'revenue', not 'revnue'. Retry with the right name.",
        "totals = sales.groupby('region')['revenue'].sum()\ntotals",
    ),
}


def observe(execution: petri.Execution) -> str:
    """What the "model" would read back: output, the value, or the error."""
    if execution.error is not None:
        return f"error: {execution.error}"
    return (execution.stdout + (execution.text or "")).strip()


def act(sandbox: petri.Sandbox, step: Step) -> petri.Execution:
    print(f"> {step.thought}")
    execution = sandbox.run(step.code, timeout=60)
    print("  " + observe(execution).replace("\n", "\n  "))
    return execution


def run_agent(sandbox: petri.Sandbox) -> str:
    """Runs the plan; returns the report the code wrote."""
    for step in PLAN:
        execution = act(sandbox, step)
        if execution.error is not None:
            fix = FIXES.get(execution.error.ename)
            if fix is None:
                raise RuntimeError(f"no fix for {execution.error}")
            execution = act(sandbox, fix)
            if execution.error is not None:
                raise RuntimeError(f"the fix failed too: {execution.error}")
    return sandbox.files.read("report.md").decode()


def main() -> int:
    try:
        # Leaving the block deletes the sandbox, whatever happened inside.
        with petri.Sandbox.create(ttl=600, labels={"example": "agent-loop"}) as sandbox:
            print(f"sandbox {sandbox.sandbox_id}")
            report = run_agent(sandbox)
    except petri.PetriError as error:
        print(f"petri: {error.message} ({error.code.name})", file=sys.stderr)
        return 1
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The end-to-end bench's rows: what a row says (``plain METHOD [zero2]``, ``trl dpo|orpo METHOD``, ``train METHOD
[dpo|orpo] [zero2] [@plain|@trl|@GIB] [key=value ...]``, e2e.py's docstring), how it is read, and what a run of it
gives back (`RowResult`, also written by trl_pref.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError

DEFAULT_ROWS = ("plain lora; train lora; train lora @plain; "
                "plain qlora; train qlora; train qlora @8 training.optimizer=adamw_8bit; "
                "plain full; train full @plain model.dtype=bf16; "
                "plain qlora zero2; train qlora zero2")
METHODS = ("lora", "qlora", "full")
OBJECTIVES = ("dpo", "orpo")  # preference rows: `trl OBJECTIVE METHOD`, `train METHOD OBJECTIVE ...`
PREFERENCE_ROWS = "trl dpo lora; train lora dpo; train lora dpo @trl"  # the comparison (bench/gpu_suite.sh)
ROW_FORMS = ("'plain METHOD [zero2]', 'train METHOD [dpo|orpo] [zero2] [@plain|@trl|@GIB] [key=value ...]' or "
             "'trl dpo|orpo METHOD' (METHOD: lora, qlora, full)")


@dataclass
class Row:
    text: str
    kind: str  # plain | train | trl
    method: str
    deepspeed: bool = False
    budget: str | None = None  # None | "plain" | "trl" | GiB as text
    overrides: list[str] = field(default_factory=list)
    objective: str | None = None  # dpo | orpo (trl rows, and train rows that name it); None: SFT

    @property
    def family(self) -> str:
        """What a row is compared with: rows of one family share the baseline row (plain or trl) of that family."""
        base = self.method + (" zero2" if self.deepspeed else "")
        return f"{self.objective} {base}" if self.objective else base

    @property
    def baseline(self) -> str:
        """The kind of row the family's baseline is: ``plain`` (SFT) or ``trl`` (dpo / orpo)."""
        return "trl" if self.objective else "plain"


@dataclass
class RowResult:
    row: str
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    ratio: float = 0.0
    steps: list[float] = field(default_factory=list)
    note: str = ""
    error: str = ""
    seconds: float = 0.0


def parse_rows(text: str) -> list[Row]:
    rows = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        words = part.split()
        if words[0] == "trl":
            if len(words) != 3 or words[1] not in OBJECTIVES or words[2] not in METHODS:
                raise TunesmithError(f"bench row {part!r}: expected 'trl dpo|orpo lora|qlora|full'",
                                     f"e.g. --rows '{PREFERENCE_ROWS}'")
            rows.append(Row(part, "trl", words[2], objective=words[1]))
            continue
        if len(words) < 2 or words[0] not in ("plain", "train") or words[1] not in METHODS:
            raise TunesmithError(f"bench row {part!r}: expected {ROW_FORMS}",
                                 "e.g. --rows 'plain lora; train lora @plain'")
        row = Row(part, words[0], words[1])
        for word in words[2:]:
            if word == "zero2":
                row.deepspeed = True
            elif word in OBJECTIVES and row.kind == "train" and row.objective is None:
                row.objective = word
            elif word.startswith("@") and row.kind == "train":
                row.budget = word[1:]
            elif "=" in word and row.kind == "train":
                row.overrides.append(word)
            else:
                raise TunesmithError(f"bench row {part!r}: cannot read {word!r}",
                                     "zero2, dpo or orpo (train rows), @plain, @trl or @GIB (train rows) and "
                                     "key=value overrides (train rows)")
        if row.budget in ("plain", "trl") and row.budget != row.baseline:
            raise TunesmithError(f"bench row {part!r}: @{row.budget} needs a {row.budget} row of the same family, "
                                 f"and this row's baseline is the {row.baseline} row",
                                 "@plain goes with SFT train rows, @trl with dpo / orpo train rows")
        rows.append(row)
    return rows

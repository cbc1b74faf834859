"""Parses every .sql file in a directory with sqlfluff's T-SQL grammar; names each file that
does not parse, with where and why, and exits 1 if any did not."""

import pathlib
import sys

import sqlfluff
import sqlfluff.dialects.dialect_tsql as tsql
from sqlfluff.api.simple import APIParsingError
from sqlfluff.core.parser import CodeSegment, RegexLexer

# SQL Server escapes a `]` inside a bracket-quoted identifier by doubling it ([a]]b] names
# `a]b`); sqlfluff's T-SQL lexer (4.5.0) knows no escape there. Teach it the server's rule,
# so names quoted right parse and names quoted wrong ([a]b]) still fail.
tsql.tsql_dialect.patch_lexer_matchers(
    [
        RegexLexer(
            "square_quote",
            r"\[(?:[^\]]|\]\])*\]",
            CodeSegment,
            segment_kwargs={"quoted_value": (r"\[((?:[^\]]|\]\])*)\]", 1)},
        )
    ]
)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: tsql-parse.py DIR", file=sys.stderr)
        return 2
    files = sorted(pathlib.Path(sys.argv[1]).glob("*.sql"))
    if not files:
        print(f"no .sql files in {sys.argv[1]}", file=sys.stderr)
        return 1
    failed = 0
    for path in files:
        try:
            sqlfluff.parse(path.read_text(encoding="utf-8"), dialect="tsql")
        except APIParsingError as err:
            failed += 1
            print(f"{path.name}: does not parse as T-SQL", file=sys.stderr)
            for violation in err.violations:
                print(f"    {violation.desc()}", file=sys.stderr)
    print(f"{len(files) - failed} of {len(files)} statements parse as T-SQL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

//! Writes every statement and batch the SQL Server driver can send into `.sql` files in a
//! directory, one per file, for each layout that changes their text, so that a T-SQL grammar
//! can check them without a server:
//!
//! ```text
//! cargo run -p backplane-mssql --example tsql -- DIR
//! ```
//!
//! Files are named `{layout}--{statement}.sql`. The test script parses each with
//! `sqlfluff parse --dialect tsql`.

use std::path::PathBuf;
use std::process::ExitCode;

use backplane_mssql::MssqlOptions;
use backplane_mssql::statements;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: tsql DIR");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    let base = MssqlOptions::new("localhost", "backplane", "secret");
    let layouts = [
        ("default", base.clone()),
        (
            "custom-schema",
            base.clone().schema("chat ops").table_prefix("rt_"),
        ),
        (
            "bracket-prefix",
            base.clone().schema("we]ird").table_prefix("p]x_"),
        ),
        ("tables-per-hub", base.clone().tables_per_hub(true)),
        (
            "tables-per-hub-bracket-prefix",
            base.schema("we]ird")
                .table_prefix("p]x_")
                .tables_per_hub(true),
        ),
    ];
    if let Err(err) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {err}", dir.display());
        return ExitCode::FAILURE;
    }
    let mut written = 0;
    for (layout, options) in &layouts {
        for statement in statements::render(options) {
            let path = dir.join(format!("{layout}--{}.sql", statement.name));
            // sqlfluff wants each file to end its last statement with a newline.
            let text = format!("{}\n", statement.text.trim_end());
            if let Err(err) = std::fs::write(&path, text) {
                eprintln!("cannot write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
            written += 1;
        }
    }
    println!("{written} statements in {}", dir.display());
    ExitCode::SUCCESS
}

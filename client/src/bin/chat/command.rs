//! What a line typed into the chat means.

/// One line of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Nothing to do (a blank line).
    Nothing,
    /// `/help`.
    Help,
    /// `/join <group>`.
    Join(String),
    /// `/leave <group>`.
    Leave(String),
    /// `/group <group> <message>`.
    Group(String, String),
    /// `/msg <user> <message>`: a durable direct message.
    Direct(String, String),
    /// `/who`.
    Who,
    /// `/quit`.
    Quit,
    /// Any other text: a message to everyone.
    Say(String),
}

/// The text `/help` prints.
pub(crate) const HELP: &str = "\
commands:
  /join <group>              join a group
  /leave <group>             leave a group
  /group <group> <message>   send a message to a group
  /msg <user> <message>      send a direct message (kept until the user is online)
  /who                       list the users online
  /quit                      leave the chat
  /help                      show this help
anything else is sent to everyone; start a line with // to send text that begins with /";

/// Parses one line; the error says what is wrong, for the user.
pub(crate) fn parse(line: &str) -> Result<Command, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(Command::Nothing);
    }
    if let Some(text) = line.strip_prefix("//") {
        return Ok(Command::Say(format!("/{text}")));
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Command::Say(line.to_owned()));
    };
    let (name, args) = match rest.split_once(char::is_whitespace) {
        Some((name, args)) => (name, args.trim()),
        None => (rest, ""),
    };
    let one = |usage: &str| -> Result<String, String> {
        match args.split_whitespace().collect::<Vec<_>>().as_slice() {
            [one] => Ok((*one).to_owned()),
            [] => Err(format!("missing argument: {usage}")),
            _ => Err(format!("too many arguments: {usage}")),
        }
    };
    let two = |usage: &str| -> Result<(String, String), String> {
        match args.split_once(char::is_whitespace) {
            Some((first, text)) if !text.trim().is_empty() => {
                Ok((first.to_owned(), text.trim().to_owned()))
            }
            _ => Err(format!("missing argument: {usage}")),
        }
    };
    let none = |command: Command| -> Result<Command, String> {
        if args.is_empty() {
            Ok(command)
        } else {
            Err(format!("/{name} takes no arguments"))
        }
    };
    match name.to_ascii_lowercase().as_str() {
        "help" | "?" => none(Command::Help),
        "join" => one("/join <group>").map(Command::Join),
        "leave" => one("/leave <group>").map(Command::Leave),
        "group" => two("/group <group> <message>").map(|(g, m)| Command::Group(g, m)),
        "msg" => two("/msg <user> <message>").map(|(u, m)| Command::Direct(u, m)),
        "who" => none(Command::Who),
        "quit" | "exit" => none(Command::Quit),
        _ => Err(format!("unknown command /{name}; type /help for the list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_command() {
        assert_eq!(parse("hello world"), Ok(Command::Say("hello world".into())));
        assert_eq!(parse("  "), Ok(Command::Nothing));
        assert_eq!(parse("/help"), Ok(Command::Help));
        assert_eq!(parse("/join rust\n"), Ok(Command::Join("rust".into())));
        assert_eq!(parse("/leave  rust "), Ok(Command::Leave("rust".into())));
        assert_eq!(
            parse("/group rust hi  there"),
            Ok(Command::Group("rust".into(), "hi  there".into()))
        );
        assert_eq!(
            parse("/msg bob see you"),
            Ok(Command::Direct("bob".into(), "see you".into()))
        );
        assert_eq!(parse("/WHO"), Ok(Command::Who));
        assert_eq!(parse("/quit"), Ok(Command::Quit));
        assert_eq!(parse("//join"), Ok(Command::Say("/join".into())));
    }

    #[test]
    fn says_what_is_wrong() {
        for (line, reason) in [
            ("/join", "missing argument: /join <group>"),
            ("/join a b", "too many arguments"),
            ("/group rust", "missing argument: /group <group> <message>"),
            ("/group rust   ", "missing argument"),
            ("/msg", "missing argument: /msg <user> <message>"),
            ("/who now", "/who takes no arguments"),
            ("/dance", "unknown command /dance"),
            ("/", "unknown command /"),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(reason), "{line}: {err}");
        }
    }
}

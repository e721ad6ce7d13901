-- How often the server failed while sending a message (the connection dropped, the fetch timed
-- out) in a fetch that included it. Such a message, and any other of the failed fetch, is then
-- fetched alone after the rest of the mail, fewest failures first: a message the server cannot
-- serve holds up no other. Not a processing attempt (a server restart mid-fetch is nobody's
-- fault), so it never makes poison. Cleared with the row by the registration.
ALTER TABLE processing_attempts ADD COLUMN fetch_failures INTEGER NOT NULL DEFAULT 0;

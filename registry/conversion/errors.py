"""How a conversion job fails. The jobs framework maps ConversionFailed to a failed job (its
message is the job's error) and ConversionCancelled to a cancelled one."""


class ConversionFailed(Exception):
    """The conversion cannot be done, or its result did not pass verification; the message
    says why (the converter's own reason, or the verification figures against the tolerances).
    Nothing is registered."""


class ConversionCancelled(ConversionFailed):
    """The job was cancelled while converting; the subprocess was stopped."""

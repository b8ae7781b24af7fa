"""Model fields shared by the apps."""

from __future__ import annotations

import base64
import logging

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models

logger = logging.getLogger(__name__)

_INFO = b"controlplane encrypted model field"


def _fernet(secret_key: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
        secret_key.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def _keys() -> MultiFernet:
    # Encrypts with SECRET_KEY; also decrypts with SECRET_KEY_FALLBACKS, so the key can be
    # rotated the way Django rotates it (values are re-encrypted when next saved).
    return MultiFernet(
        [_fernet(k) for k in [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]]
    )


def encrypt(value: str) -> str:
    return _keys().encrypt(value.encode()).decode()


def decrypt(token: str) -> str | None:
    """The plaintext, or None when no configured key opens it (SECRET_KEY changed without
    its old value in SECRET_KEY_FALLBACKS)."""
    try:
        return _keys().decrypt(token.encode()).decode()
    except InvalidToken:
        return None


class EncryptedTextField(models.TextField):
    """Text kept encrypted in the database (Fernet, key derived from SECRET_KEY) and plain in
    Python: for secrets the control plane must use again, such as webhook signing keys, so a
    database dump or backup does not give them away. Not searchable. A value no key opens
    reads as an empty string, and a warning is logged."""

    def from_db_value(self, value, expression, connection):
        if value is None or value == "":
            return value
        plain = decrypt(value)
        if plain is None:
            logger.warning(
                "%s.%s: a stored value cannot be decrypted with SECRET_KEY or SECRET_KEY_FALLBACKS",
                self.model.__name__,
                self.name,
            )
            return ""
        return plain

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(value)

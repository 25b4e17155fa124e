"""One rule decides whether a --data/--model/--vae string is a hub id (it was decided in five places)."""

import pytest

from latent_ddpm.sources import is_hub_id


@pytest.mark.parametrize("text", ["user/repo", "my-org/latents.v2", "a/b"])
def test_owner_name_is_a_hub_id(text):
    assert is_hub_id(text)


@pytest.mark.parametrize("text", ["./user/repo", "/abs/path", "~/runs", "runs/demo/pipeline", "repo", "user\\repo",
                                  "user/re po", "user/repo--x", "", None, 3])
def test_paths_and_invalid_ids_are_not(text):
    assert not is_hub_id(text)


def test_an_existing_folder_of_that_shape_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user" / "repo").mkdir(parents=True)
    assert not is_hub_id("user/repo")


@pytest.mark.parametrize("source", ["~/latents", "user/latents.npz", "./user/repo"])
def test_load_latents_never_sends_a_path_to_the_hub(source):
    # A missing local path is "no such file", not a hub lookup (offline: a lookup would fail differently).
    from latent_ddpm.data import DataError, load_latents

    with pytest.raises(DataError, match="no such file or folder"):
        load_latents(source)

"""`hf://ORG/REPO/PATH[@REVISION]`: a file of a Hugging Face hub repository, as `config.pretrained` and
`python -m autolora_jax.convert --src=` take it.

`resolve` downloads the file with `huggingface_hub.hf_hub_download` into huggingface_hub's own cache (a
second run finds it there), so the library's settings apply: HF_HUB_CACHE or HF_HOME (where the cache is),
HF_HUB_OFFLINE=1 (no network: the file must be in the cache already), HF_TOKEN (private or gated
repositories). REVISION is a branch, tag or commit (default: main); `hf://ORG/REPO@REVISION/PATH`, the
form of huggingface_hub's HfFileSystem, is read too. Only model repositories are read.

huggingface_hub is imported only when a hub path is resolved; every failure is a one-paragraph
`CheckpointError`.
"""

from __future__ import annotations

import logging
import re
from typing import NamedTuple, Optional

from autolora_jax.errors import CheckpointError

log = logging.getLogger(__name__)

SCHEME = 'hf://'
FORM = 'hf://ORG/REPO/PATH or hf://ORG/REPO/PATH@REVISION'
EXAMPLE = 'hf://madrylab/robust-imagenet-models/resnet18_linf_eps4.0.ckpt'
HUB_INSTALL = "pip install 'huggingface-hub>=0.30,<3'"
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')  # an organisation, user or repository name


class HubPath(NamedTuple):
  repo_id: str  # 'ORG/REPO'
  filename: str  # the file's path inside the repository
  revision: Optional[str]  # branch, tag or commit; None: main

  def __str__(self) -> str:
    return f'{SCHEME}{self.repo_id}/{self.filename}' + (f'@{self.revision}' if self.revision else '')


def is_hub_path(path) -> bool:
  """Whether `path` names a hub file (starts with hf://)."""
  return isinstance(path, str) and path.startswith(SCHEME)


def parse_hub_path(path: str) -> HubPath:
  """'hf://ORG/REPO/PATH[@REVISION]' (or 'hf://ORG/REPO@REVISION/PATH') -> HubPath.

  Raises:
    CheckpointError for anything else, saying which form is expected.
  """
  def malformed(why):
    return CheckpointError(f'{path!r} is not a Hugging Face hub file path ({why}): expected {FORM} (PATH the '
                           'file inside the model repository, REVISION a branch, tag or commit, main if left '
                           f'out), e.g. {EXAMPLE}.')

  if not is_hub_path(path):
    raise malformed(f'it does not start with {SCHEME}')
  parts = path[len(SCHEME):].split('/', 2)
  if len(parts) < 3 or not parts[2]:
    raise malformed('no file path after ORG/REPO')
  org, repo, rest = parts
  revision = None
  if '@' in repo:  # HfFileSystem's form: hf://ORG/REPO@REVISION/PATH
    repo, revision = repo.split('@', 1)
    if '@' in rest:
      raise malformed('two revisions')
  elif '@' in rest:
    rest, revision = rest.split('@', 1)
  if revision is not None and (not revision or revision != revision.strip()):
    raise malformed('an empty revision after @')
  for name, what in ((org, 'ORG'), (repo, 'REPO')):
    if not _NAME.fullmatch(name) or '..' in name or len(name) > 96:
      raise malformed(f'{what} {name!r} is not a valid name')
  pieces = rest.split('/')
  if any(p in ('', '.', '..') for p in pieces) or rest != rest.strip():
    raise malformed(f'the file path {rest!r} has an empty, "." or ".." component')
  return HubPath(f'{org}/{repo}', rest, revision)


def cli_name() -> str:
  """The command-line tool the installed huggingface_hub ships: 'hf' (0.34 and later) or 'huggingface-cli'."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    major, minor = (int(v) for v in re.findall(r'\d+', huggingface_hub.__version__)[:2])
  except (ImportError, ValueError):
    return 'hf'
  return 'hf' if (major, minor) >= (0, 34) else 'huggingface-cli'


def download_command(hub_path: HubPath) -> str:
  """The shell command that puts the file into the hub cache on a machine with network."""
  revision = f' --revision {hub_path.revision}' if hub_path.revision else ''
  return f'{cli_name()} download {hub_path.repo_id} {hub_path.filename}{revision}'


def _login_command() -> str:
  return 'hf auth login' if cli_name() == 'hf' else 'huggingface-cli login'


def resolve(path: str) -> str:
  """The local file of a hub path, downloaded into (or found in) huggingface_hub's cache.

  Raises:
    CheckpointError for a malformed path, huggingface_hub not installed, a file not in the cache while
    offline (HF_HUB_OFFLINE=1 or no network), a repository, revision or file that does not exist, or a
    gated repository without access.
  """
  hub_path = parse_hub_path(path)
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top (only for hub paths)
    from huggingface_hub import constants, errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f'Reading {path} needs huggingface_hub, which is not installed: {HUB_INSTALL}, or '
                          f'download the file yourself and pass its local path.') from None
  repo, name, rev = hub_path.repo_id, hub_path.filename, hub_path.revision or 'main'
  page = f'https://huggingface.co/{repo}'
  err = lambda kind: getattr(errors, kind, ())  # noqa: E731 (older huggingface_hub lacks some kinds)
  try:
    local = huggingface_hub.hf_hub_download(repo_id=repo, filename=name, revision=hub_path.revision)
  except err('LocalEntryNotFoundError'):
    offline = getattr(constants, 'is_offline_mode', lambda: constants.HF_HUB_OFFLINE)()
    why = ('HF_HUB_OFFLINE is set, so nothing is downloaded' if offline
           else 'the hub cannot be reached (no network?)')
    raise CheckpointError(
        f'{path} is not in the Hugging Face hub cache ({constants.HF_HUB_CACHE}) and cannot be downloaded: '
        f'{why}. On a machine with network, run `{download_command(hub_path)}`, which fills huggingface_hub\'s '
        'cache (run it with the same HF_HUB_CACHE or HF_HOME, or copy that cache folder here), or convert it '
        f'there with `python -m autolora_jax.convert --src={path} --dst=DIR --arch=...` and pass '
        'config.pretrained=DIR.'
    ) from None
  except err('GatedRepoError'):
    raise CheckpointError(f'The hub repository {repo} is gated: accept its terms on {page} and log in '
                          f'(`{_login_command()}` or HF_TOKEN) to download {path}.') from None
  except err('RepositoryNotFoundError'):
    raise CheckpointError(f'The hub repository {repo} of {path} does not exist (or is private: log in with '
                          f'`{_login_command()}` or set HF_TOKEN). Check the name on {page}.') from None
  except err('RevisionNotFoundError'):
    raise CheckpointError(f'The hub repository {repo} has no revision {rev!r} (branch, tag or commit) for '
                          f'{path}: check {page}/tree/main, or leave @REVISION out for main.') from None
  except err('EntryNotFoundError'):
    raise CheckpointError(f'The hub repository {repo} has no file {name!r} at revision {rev!r} ({path}): see '
                          f'the files on {page}/tree/{rev}.') from None
  except err('HFValidationError') as e:
    raise CheckpointError(f'{path!r} is not a valid hub file path ({str(e)[:200]}): expected {FORM}, e.g. '
                          f'{EXAMPLE}.') from None
  except OSError as e:  # network and HTTP errors (HfHubHTTPError is an OSError), a cache that cannot be written
    raise CheckpointError(f'Downloading {path} from the Hugging Face hub failed ({type(e).__name__}: '
                          f'{str(e)[:300]}). Retry, or download it with `{download_command(hub_path)}` and '
                          'run again.') from None
  log.info('%s is %s', path, local)
  return local

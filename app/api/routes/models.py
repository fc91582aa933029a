"""GET /v1/models: what is being served and how."""

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.schemas import ErrorBody, ModelsInfo
from app.core.service import NotReady

router = APIRouter(prefix="/models", tags=["models"])


# exclude_unset: the card as its file says it, without the schema's empty optional sections.
@router.get(
    "",
    response_model=ModelsInfo,
    response_model_exclude_unset=True,
    responses={401: {"model": ErrorBody}, 503: {"model": ErrorBody}},
)
async def models(service: ServiceDep) -> ModelsInfo:
    if service.models is None:
        raise NotReady(service.failure or "the models are still loading and warming up; retry shortly")
    card, settings = service.card, service.settings
    return ModelsInfo(
        card=card.card,
        providers=service.models.providers,
        thresholds={"classifier": card.classifier.threshold, "segmenter": card.segmenter.threshold},
        input_size=card.input_size,
        batching={
            "enabled": settings.batching,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
        },
    )
